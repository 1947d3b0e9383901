//! JSON lines with the session's fields at the top level. tracing-subscriber's own JSON format
//! nests span fields under `span` and `spans`, so a log query for `user="alice"` would miss the
//! transfer lines that get their user from the session span.

use std::fmt;

use serde_json::{Map, Value};
use tracing::{Event, Subscriber, field::Field};
use tracing_subscriber::{
    field::Visit,
    fmt::{
        FmtContext, FormatEvent, FormatFields, FormattedFields,
        format::Writer,
        time::{FormatTime, SystemTime},
    },
    registry::LookupSpan,
};

/// Writes one JSON object per event: `timestamp`, `level`, `target`, `message`, the event's
/// fields, then the fields of the enclosing spans that the event does not set itself. Span
/// fields must be formatted by `tracing_subscriber::fmt::format::JsonFields`.
pub struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'lookup> LookupSpan<'lookup>,
    N: for<'writer> FormatFields<'writer> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let mut object = Map::new();

        let mut timestamp = String::new();
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        object.insert("timestamp".to_string(), Value::String(timestamp));
        let metadata = event.metadata();
        object.insert("level".to_string(), Value::String(metadata.level().to_string()));
        object.insert("target".to_string(), Value::String(metadata.target().to_string()));

        event.record(&mut JsonVisitor(&mut object));

        // Innermost span first, so that a field set on an inner span wins over an outer one.
        if let Some(scope) = ctx.event_scope() {
            for span in scope {
                let extensions = span.extensions();
                let Some(formatted) = extensions.get::<FormattedFields<N>>() else {
                    continue;
                };
                let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(&formatted.fields) else {
                    continue;
                };
                for (key, value) in fields {
                    object.entry(key).or_insert(value);
                }
            }
        }

        writeln!(writer, "{}", Value::Object(object))
    }
}

/// Collects an event's fields as JSON values; numbers and booleans stay typed.
struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl JsonVisitor<'_> {
    fn insert(&mut self, field: &Field, value: Value) {
        self.0.insert(field.name().to_string(), value);
    }
}

impl Visit for JsonVisitor<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.insert(field, serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.insert(field, Value::from(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.insert(field, Value::from(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.insert(field, Value::from(value));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.insert(field, Value::from(value));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.insert(field, Value::from(value.to_string()));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.insert(field, Value::from(format!("{value:?}")));
    }
}
