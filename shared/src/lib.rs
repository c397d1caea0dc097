//! Wire types shared by the kip edge agent and the control plane.
//!
//! Invariants:
//! - No I/O lives here: only data types, their validation and their encoding; the one
//!   exception is [`logging`], the log subscriber both binaries install.
//! - Every type that crosses the network is versioned through [`PROTOCOL_VERSION`];
//!   a field added later is optional so that older peers keep decoding newer messages.

pub mod backoff;
pub mod ids;
pub mod mqtt;

pub use ids::{Name, NameError};

/// Version of the agent <-> control-plane protocol spoken by this build.
pub const PROTOCOL_VERSION: u32 = 1;
pub mod record;

pub use record::{
    DeadLetter, Gap, Loss, ModelDrift, ModelRole, ModelStats, Prediction, Quality, Reading, Record,
    RecordKind, Sequenced,
};
pub mod batch;
pub mod drift;
pub mod feature_set;
pub mod features;
pub mod health;
pub mod live;
pub mod logging;
pub mod sync;
pub mod validate;

#[cfg(test)]
pub(crate) mod test_support {
    use proptest::prelude::*;

    /// A string for a message field: mostly short and plausible, sometimes with NUL, control
    /// characters, quotes and backslashes, any Unicode scalar, or 1000 to 4000 bytes long.
    /// Drawn as (seed, length, shape) and expanded here: drawing every character through
    /// proptest (or a regex) costs microseconds each in a debug build, which would dominate
    /// thousands of cases.
    pub(crate) fn hostile_text() -> impl Strategy<Value = String> {
        (any::<u64>(), 0usize..16, 0u8..17).prop_map(|(seed, len, shape)| {
            if shape == 16 {
                return "m".repeat(1000 + (seed % 3000) as usize);
            }
            let mut x = seed | 1;
            (0..len)
                .map(|_| {
                    // xorshift64: cheap, deterministic per seed.
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let r = (x >> 8) as u32;
                    match r % 19 {
                        0..=9 => char::from(b'a' + (r / 19 % 26) as u8),
                        10..=12 => char::from(b'0' + (r / 19 % 10) as u8),
                        13 => '\0',
                        14 => char::from((1 + r / 19 % 31) as u8),
                        15 => ['"', '\\', '/', '-', '.', ' '][(r / 19 % 6) as usize],
                        _ => char::from_u32(r / 19 % 0x11_0000).unwrap_or('\u{fffd}'),
                    }
                })
                .collect()
        })
    }

    /// One way a hostile or broken peer damages a valid JSON message; see [`Damage::apply`].
    #[derive(Debug, Clone)]
    pub(crate) struct Damage {
        how: u8,
        pos: usize,
        byte: u8,
    }

    pub(crate) fn damage() -> impl Strategy<Value = Damage> {
        (0u8..10, any::<usize>(), any::<u8>()).prop_map(|(how, pos, byte)| Damage {
            how,
            pos,
            byte,
        })
    }

    impl Damage {
        /// Damages `json`: left intact (3 in 10), truncated, a byte inserted or replaced, the
        /// string `text_target` (a JSON string literal in the message) replaced by an
        /// unpaired surrogate or NUL escape or by deep nesting, the `"key":1` member
        /// `number_target` given a huge, negative or overflowing number, or an unknown field
        /// and tag added.
        pub(crate) fn apply(
            &self,
            mut json: Vec<u8>,
            text_target: &str,
            number_target: &str,
        ) -> Vec<u8> {
            let at = if json.is_empty() {
                0
            } else {
                self.pos % json.len()
            };
            let pick = |options: &[&'static str]| options[usize::from(self.byte) % options.len()];
            let replace = |json: &[u8], from: &str, to: &str| {
                String::from_utf8_lossy(json)
                    .replacen(from, to, 1)
                    .into_bytes()
            };
            match self.how {
                0..=2 => json,
                3 => {
                    json.truncate(at);
                    json
                }
                4 => {
                    json.insert(at, self.byte);
                    json
                }
                5 => {
                    if let Some(b) = json.get_mut(at) {
                        *b = self.byte;
                    }
                    json
                }
                6 => replace(
                    &json,
                    text_target,
                    pick(&[
                        "\"\\ud800\"",
                        "\"\\udc00x\"",
                        "\"\\u0000\"",
                        "\"\\ud83d\\u0041\"",
                    ]),
                ),
                7 => {
                    let depth = 1 + usize::from(self.byte) * 40;
                    let nested = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
                    replace(&json, text_target, &nested)
                }
                8 => {
                    let key = number_target.trim_end_matches('1');
                    let to = format!(
                        "{key}{}",
                        pick(&["18446744073709551616", "-1", "1e999", "0.5"])
                    );
                    replace(&json, number_target, &to)
                }
                _ => {
                    let json = replace(&json, "\"kind\":\"", "\"kind\":\"x");
                    replace(&json, "{", "{\"extra_field\":[],")
                }
            }
        }
    }

    /// Proptest settings for the hostile-input properties: `default_cases` cases unless
    /// `PROPTEST_CASES` says otherwise (CI can raise it), failures persisted as usual.
    pub(crate) fn proptest_config(default_cases: u32) -> proptest::test_runner::Config {
        let cases = std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default_cases);
        proptest::test_runner::Config {
            cases,
            ..proptest::test_runner::Config::default()
        }
    }
}
