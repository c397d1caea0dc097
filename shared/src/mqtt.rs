//! One MQTT broker endpoint type for the agent (sources, live-query responder) and the control
//! plane (live-query client): `mqtt://host[:port]` or `mqtts://host[:port]` plus the TLS
//! files, checked once.
//!
//! Invariants:
//! - The port defaults to 1883 (`mqtt://`) or 8883 (`mqtts://`); port 0 is refused.
//! - An IPv6 literal must be in brackets (`mqtt://[::1]:1883`); an unbracketed one
//!   (`mqtt://::1`) is refused instead of being split at its last colon. [`MqttEndpoint::host`]
//!   is the bare address (`::1`), [`MqttEndpoint::socket_host`] the form a `host:port` string
//!   needs (`[::1]`: rumqttc formats `{host}:{port}` before resolving).
//! - `mqtts://` needs a CA file; a client certificate and key come together or not at all;
//!   TLS files on an `mqtt://` URL are refused (they would be ignored silently).
//! - No I/O: files are named here, read by the caller when it connects.

use std::{fmt, net::Ipv6Addr, path::PathBuf};

/// Default port of `mqtt://`.
pub const MQTT_PORT: u16 = 1883;
/// Default port of `mqtts://`.
pub const MQTTS_PORT: u16 = 8883;

/// TLS settings of an `mqtts://` endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttTls {
    /// PEM file of the CA(s) that signed the broker's certificate.
    pub ca_file: PathBuf,
    /// PEM client certificate (chain) and key files for mutual TLS.
    pub client_auth: Option<(PathBuf, PathBuf)>,
}

/// A checked broker endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttEndpoint {
    host: String,
    port: u16,
    tls: Option<MqttTls>,
}

/// Which setting is wrong and why; `field` is relative (`url`, `ca_file`, ...), the caller
/// prefixes its own path (`mqtt[0].url`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct MqttEndpointError {
    pub field: &'static str,
    pub message: String,
}

fn err(field: &'static str, message: impl Into<String>) -> MqttEndpointError {
    MqttEndpointError {
        field,
        message: message.into(),
    }
}

/// The TLS files as written in a config section (all optional).
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    pub ca_file: Option<PathBuf>,
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
}

impl MqttEndpoint {
    /// Parses `url` and checks the TLS files against its scheme.
    pub fn parse(url: &str, files: TlsFiles) -> Result<Self, MqttEndpointError> {
        let (secure, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("mqtt://") {
            (false, r)
        } else {
            return Err(err(
                "url",
                format!("{url:?} must start with mqtt:// or mqtts://"),
            ));
        };
        let shape = || err("url", format!("{url:?} must be mqtt[s]://host[:port]"));
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let default_port = if secure { MQTTS_PORT } else { MQTT_PORT };
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (addr, after) = v6.split_once(']').ok_or_else(shape)?;
            addr.parse::<Ipv6Addr>()
                .map_err(|_| err("url", format!("{addr:?} in {url:?} is not an IPv6 address")))?;
            let port = match after {
                "" => default_port,
                p => parse_port(p.strip_prefix(':').ok_or_else(shape)?)?,
            };
            (addr, port)
        } else {
            match rest.split_once(':') {
                Some((_, p)) if p.contains(':') => {
                    return Err(err(
                        "url",
                        format!("{url:?}: an IPv6 address must be in brackets (mqtt://[::1]:1883)"),
                    ));
                }
                Some((h, p)) => (h, parse_port(p)?),
                None => (rest, default_port),
            }
        };
        if host.is_empty() || host.contains(['/', '@', '?', '#', ' ']) {
            return Err(shape());
        }
        let client_auth = match (files.client_cert_file, files.client_key_file) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(err(
                    "client_key_file",
                    "is required when client_cert_file is set",
                ));
            }
            (None, Some(_)) => {
                return Err(err(
                    "client_cert_file",
                    "is required when client_key_file is set",
                ));
            }
        };
        let tls = if secure {
            let ca_file = files
                .ca_file
                .ok_or_else(|| err("ca_file", "is required for an mqtts:// url"))?;
            Some(MqttTls {
                ca_file,
                client_auth,
            })
        } else {
            if files.ca_file.is_some() || client_auth.is_some() {
                return Err(err(
                    "url",
                    "TLS files are configured but the url is mqtt:// (plain); use mqtts://",
                ));
            }
            None
        };
        Ok(Self {
            host: host.to_owned(),
            port,
            tls,
        })
    }

    /// The host name or address, without brackets.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The host as it goes before `:port` (IPv6 literals bracketed).
    pub fn socket_host(&self) -> String {
        if self.is_ipv6_literal() {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        }
    }

    /// True when the host is an IPv6 address.
    pub fn is_ipv6_literal(&self) -> bool {
        self.host.parse::<Ipv6Addr>().is_ok()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `None` for `mqtt://`.
    pub fn tls(&self) -> Option<&MqttTls> {
        self.tls.as_ref()
    }

    /// Refuses what rumqttc cannot connect to: `mqtts://` to an IPv6 literal (rumqttc 0.25
    /// takes the TLS server name from the host string and cannot make one from a bracketed
    /// IPv6 address). Every client of this workspace is rumqttc: call it after [`Self::parse`].
    pub fn check_rumqttc(&self) -> Result<(), MqttEndpointError> {
        if self.tls.is_some() && self.is_ipv6_literal() {
            return Err(err(
                "url",
                "mqtts:// to an IPv6 address is not supported (TLS needs a host name); use a name",
            ));
        }
        Ok(())
    }
}

impl fmt::Display for MqttEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls.is_some() { "mqtts" } else { "mqtt" };
        write!(f, "{scheme}://{}:{}", self.socket_host(), self.port)
    }
}

fn parse_port(p: &str) -> Result<u16, MqttEndpointError> {
    p.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| err("url", format!("{p:?} is not a port number")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(url: &str) -> Result<MqttEndpoint, MqttEndpointError> {
        MqttEndpoint::parse(url, TlsFiles::default())
    }

    fn ca() -> TlsFiles {
        TlsFiles {
            ca_file: Some("/ca.pem".into()),
            ..TlsFiles::default()
        }
    }

    #[test]
    fn host_port_and_default_ports() {
        let e = plain("mqtt://broker.local:1884/").unwrap();
        assert_eq!((e.host(), e.port(), e.tls()), ("broker.local", 1884, None));
        assert_eq!(plain("mqtt://b").unwrap().port(), MQTT_PORT);
        let s = MqttEndpoint::parse("mqtts://b", ca()).unwrap();
        assert_eq!(s.port(), MQTTS_PORT);
        assert_eq!(s.tls().unwrap().ca_file, PathBuf::from("/ca.pem"));
        assert_eq!(s.to_string(), "mqtts://b:8883");
    }

    #[test]
    fn ipv6_literals_need_brackets_and_keep_their_port() {
        let e = MqttEndpoint::parse("mqtts://[::1]:8883", ca()).unwrap();
        assert_eq!((e.host(), e.port()), ("::1", 8883));
        assert_eq!(e.socket_host(), "[::1]");
        assert!(e.is_ipv6_literal());
        let e = plain("mqtt://[fe80::1]").unwrap();
        assert_eq!((e.host(), e.port()), ("fe80::1", MQTT_PORT));
        assert_eq!(e.to_string(), "mqtt://[fe80::1]:1883");
        for bad in [
            "mqtt://::1",
            "mqtt://::1:1883",
            "mqtt://[::1",
            "mqtt://[zz]:1",
            "mqtt://[::1]x",
        ] {
            assert_eq!(plain(bad).unwrap_err().field, "url", "{bad}");
        }
        assert_eq!(
            plain("mqtt://127.0.0.1:1").unwrap().socket_host(),
            "127.0.0.1"
        );
    }

    #[test]
    fn rumqttc_cannot_do_tls_to_an_ipv6_literal() {
        let e = MqttEndpoint::parse("mqtts://[::1]:8883", ca()).unwrap();
        assert_eq!(e.check_rumqttc().unwrap_err().field, "url");
        assert!(plain("mqtt://[::1]").unwrap().check_rumqttc().is_ok());
        assert!(
            MqttEndpoint::parse("mqtts://b", ca())
                .unwrap()
                .check_rumqttc()
                .is_ok()
        );
    }

    #[test]
    fn bad_urls_and_tls_combinations_name_the_field() {
        let cases: [(&str, TlsFiles, &str); 7] = [
            ("http://b", TlsFiles::default(), "url"),
            ("mqtt://b:0", TlsFiles::default(), "url"),
            ("mqtt://:1883", TlsFiles::default(), "url"),
            ("mqtt://a/b", TlsFiles::default(), "url"),
            ("mqtts://b", TlsFiles::default(), "ca_file"),
            ("mqtt://b", ca(), "url"),
            (
                "mqtts://b",
                TlsFiles {
                    client_cert_file: Some("/c".into()),
                    ..ca()
                },
                "client_key_file",
            ),
        ];
        for (url, files, field) in cases {
            assert_eq!(
                MqttEndpoint::parse(url, files).unwrap_err().field,
                field,
                "{url}"
            );
        }
    }
}
