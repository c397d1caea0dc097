//! The process-wide log output of `kip-control-plane` and `kip-agent`, in one place so both
//! binaries write the same shapes. `log.format` selects one of [`LogFormat`]:
//!
//! - `text`: human-readable lines on stderr, for terminals.
//! - `json`: tracing-subscriber's JSON objects on stderr (kept for existing setups).
//! - `ecs`: one JSON object per line on **stdout** with Elastic Common Schema field names,
//!   for a log shipper (Fluent Bit in `deploy/k8s/logging/`) writing to Elasticsearch.
//!
//! Invariants of the `ecs` format (tested in `shared/src/logging.rs` and by the e2e test
//! `logs`, which runs the real control plane):
//! - Every line is one complete JSON object (one `write` per event) carrying `@timestamp`
//!   (RFC 3339, UTC, microseconds), `log.level`, `log.logger`, `message`, `service.name`,
//!   `service.version`, `ecs.version` and `event.dataset` (`<service>.log`).
//! - Inside a span: `trace.id` (the root span's id) and `span.id`/`span.name` (the innermost
//!   span), both 16 hex digits of tracing's span ids (unique among live spans of a process).
//! - The event's own fields and those of its spans (innermost wins) go under `kip.*`, never
//!   at the top level: a field named like an ECS object (`error`, `event`) would otherwise
//!   clash with Elasticsearch's mapping of that object.
//!
//! This module formats; it does not redact. Secrets stay out of logs because no code logs
//! them (a key's prefix or id, never the key), which the e2e test checks by scanning a
//! control plane's log for the secrets it issued.

use std::fmt;

use serde_json::{Map, Value};
use tracing::{Event, Subscriber, field::Field};
use tracing_subscriber::{
    EnvFilter,
    fmt::{
        FmtContext, FormatEvent, FormatFields, FormattedFields,
        format::{JsonFields, Writer},
    },
    registry::LookupSpan,
};

/// The ECS version the `ecs` format follows.
pub const ECS_VERSION: &str = "8.11.0";

/// Log output format (`log.format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// tracing-subscriber's JSON objects on stderr.
    Json,
    /// Human-readable lines on stderr, for terminals.
    Text,
    /// Elastic Common Schema JSON, one object per line on stdout, for log shippers.
    Ecs,
}

impl LogFormat {
    /// Parses a `log.format` value; the error names the accepted values.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "json" => Ok(Self::Json),
            "text" => Ok(Self::Text),
            "ecs" => Ok(Self::Ecs),
            other => Err(format!(
                "must be \"ecs\", \"json\" or \"text\", got {other:?}"
            )),
        }
    }
}

/// Installs the global tracing subscriber for `service` (`CARGO_PKG_NAME`-like, e.g.
/// `kip-control-plane`) at `version`. An invalid `filter` falls back to `info`; a second
/// call (tests starting several servers in one process) keeps the first subscriber.
pub fn init(service: &'static str, version: &'static str, format: LogFormat, filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = match format {
        LogFormat::Text => builder.with_writer(std::io::stderr).try_init(),
        LogFormat::Json => builder.with_writer(std::io::stderr).json().try_init(),
        LogFormat::Ecs => builder
            .with_writer(std::io::stdout)
            .fmt_fields(JsonFields::new())
            .event_format(Ecs::new(service, version))
            .try_init(),
    };
}

/// The `ecs` event format. Span fields must be recorded with [`JsonFields`] (as [`init`]
/// does) to be carried over; others are ignored.
#[derive(Debug, Clone)]
pub struct Ecs {
    service: &'static str,
    version: &'static str,
    dataset: String,
}

impl Ecs {
    pub fn new(service: &'static str, version: &'static str) -> Self {
        Self {
            service,
            version,
            dataset: format!("{service}.log"),
        }
    }
}

impl<S, N> FormatEvent<S, N> for Ecs
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut out = Map::new();
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        out.insert("@timestamp".into(), now.into());
        out.insert(
            "log.level".into(),
            meta.level().as_str().to_ascii_lowercase().into(),
        );
        out.insert("log.logger".into(), meta.target().into());
        let mut fields = Map::new();
        if let Some(scope) = ctx.event_scope() {
            let mut innermost = None;
            for span in scope.from_root() {
                if innermost.is_none() {
                    out.insert("trace.id".into(), hex_id(&span.id()).into());
                }
                if let Some(f) = span.extensions().get::<FormattedFields<N>>()
                    && let Ok(Value::Object(m)) = serde_json::from_str::<Value>(f.as_str())
                {
                    fields.extend(m);
                }
                innermost = Some((span.id(), span.name()));
            }
            if let Some((id, name)) = innermost {
                out.insert("span.id".into(), hex_id(&id).into());
                out.insert("span.name".into(), name.into());
            }
        }
        let mut visitor = Visitor {
            fields: &mut fields,
            message: None,
        };
        event.record(&mut visitor);
        let message = visitor.message.take().unwrap_or_default();
        out.insert("message".into(), message.into());
        out.insert("service.name".into(), self.service.into());
        out.insert("service.version".into(), self.version.into());
        out.insert("ecs.version".into(), ECS_VERSION.into());
        out.insert("event.dataset".into(), self.dataset.clone().into());
        if !fields.is_empty() {
            out.insert("kip".into(), Value::Object(fields));
        }
        // serde_json escapes control characters, so a field holding a newline still yields
        // one line.
        writeln!(writer, "{}", Value::Object(out))
    }
}

fn hex_id(id: &tracing::span::Id) -> String {
    format!("{:016x}", id.into_u64())
}

/// Collects an event's fields; `message` apart.
struct Visitor<'a> {
    fields: &'a mut Map<String, Value>,
    message: Option<String>,
}

impl Visitor<'_> {
    fn put(&mut self, field: &Field, value: Value) {
        if field.name() == "message" {
            self.message = Some(match value {
                Value::String(s) => s,
                other => other.to_string(),
            });
        } else {
            self.fields.insert(field.name().to_owned(), value);
        }
    }
}

impl tracing::field::Visit for Visitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, format!("{value:?}").into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, value.to_string().into());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn ecs_lines_carry_the_schema_fields_span_ids_and_span_fields() {
        let buf = Buf::default();
        let w = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || w.clone())
            .fmt_fields(JsonFields::new())
            .event_format(Ecs::new("kip-test", "1.2.3"))
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("outside");
            let outer = tracing::info_span!("request", device = "gw-1");
            let _o = outer.enter();
            let inner = tracing::info_span!("sync", batch = 7u64);
            let _i = inner.enter();
            tracing::warn!(error = "boom\nsecond line", "stored {} records", 3);
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        for l in &lines {
            for k in [
                "@timestamp",
                "log.level",
                "message",
                "service.name",
                "service.version",
                "ecs.version",
                "event.dataset",
            ] {
                assert!(l.get(k).is_some(), "{k} missing in {l}");
            }
            assert_eq!(l["service.name"], "kip-test");
            assert_eq!(l["event.dataset"], "kip-test.log");
        }
        assert_eq!(lines[0]["message"], "outside");
        assert!(lines[0].get("trace.id").is_none());
        let e = &lines[1];
        assert_eq!(e["log.level"], "warn");
        assert_eq!(e["message"], "stored 3 records");
        assert_eq!(e["span.name"], "sync");
        assert_eq!(e["kip"]["device"], "gw-1");
        assert_eq!(e["kip"]["batch"], 7);
        assert_eq!(e["kip"]["error"], "boom\nsecond line");
        assert_ne!(e["trace.id"], e["span.id"]);
        assert_eq!(e["trace.id"].as_str().unwrap().len(), 16);
    }

    #[test]
    fn parse_names_the_accepted_formats() {
        assert_eq!(LogFormat::parse("ecs"), Ok(LogFormat::Ecs));
        assert!(LogFormat::parse("xml").unwrap_err().contains("\"ecs\""));
    }
}
