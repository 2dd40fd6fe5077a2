//! The Compute API's published discovery document (compute v1, trimmed to what clusterctl uses)
//! and a checker of requests and responses against it.
//!
//! The document is `discovery/compute-v1.json` (see `discovery/README.md` for where it comes from
//! and how to regenerate it). It is parsed once, on first use. Tests run every request the REST
//! client sends and every response the fake serves through these checks, so neither side can
//! drift from the real API: a misspelled field, a wrong type, an unknown query parameter or a
//! path that names no method is an error naming where it is and what was expected.
//!
//! Deliberately not checked: output-only fields in requests (the document marks some `readOnly`,
//! and Google ignores them on input), and the `format` of plain strings such as
//! `google-datetime`. A JSON `null` for an object property is accepted, as Google does (it means
//! "unset").

use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;

use serde_json::{Map, Value};

/// A request or response that does not match the discovery document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SchemaError(pub String);

/// Finds the method a request calls (`compute.instances.insert`) from its HTTP method and its
/// path with query (`/compute/v1/projects/p/zones/z/instances?requestId=...`), and checks the
/// path and query parameters (required, types, enums, patterns) and the body against the
/// method's request schema (unknown fields are errors, types, enums, nested schemas).
pub fn check_request(
    http_method: &str,
    path_and_query: &str,
    body: Option<&Value>,
) -> Result<&'static str, SchemaError> {
    let doc = discovery()?;
    let (path, query) = match path_and_query.split_once('?') {
        Some((path, query)) => (path, query),
        None => (path_and_query, ""),
    };
    let prefix = format!("/{}", doc.service_path);
    let rest = path
        .strip_prefix(&prefix)
        .ok_or_else(|| SchemaError(format!("path {path} is not under {prefix}")))?;
    let segments: Vec<&str> = rest.split('/').collect();

    let matching: Vec<&Method> = doc
        .methods
        .iter()
        .filter(|m| m.matches(&segments))
        .collect();
    if matching.is_empty() {
        return Err(SchemaError(format!(
            "no compute method matches {http_method} {path}"
        )));
    }
    let method = matching
        .iter()
        .filter(|m| m.http_method.eq_ignore_ascii_case(http_method))
        .max_by_key(|m| m.literal_segments())
        .copied()
        .ok_or_else(|| {
            let mut others: Vec<String> = matching
                .iter()
                .map(|m| format!("{} for {}", m.http_method, m.id))
                .collect();
            others.dedup();
            SchemaError(format!(
                "{http_method} {path} is not a compute method (the path takes {})",
                others.join(", ")
            ))
        })?;
    let id: &'static str = method.id.as_str();
    let fail = |message: String| SchemaError(format!("{id}: {message}"));

    // Path parameters: matched by position, so present; check their values.
    for (template, segment) in method.segments.iter().zip(&segments) {
        if let Segment::Param(name) = template {
            let value = percent_decode(segment, false).map_err(|e| fail(e.0))?;
            let param = method.params.get(name).ok_or_else(|| {
                fail(format!(
                    "path parameter {name} is not described by the method"
                ))
            })?;
            param.check(name, &value, doc).map_err(fail)?;
        }
    }

    // Query parameters: the method's own, then the standard ones of the whole API.
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (raw_key, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = percent_decode(raw_key, true).map_err(|e| fail(e.0))?;
        let value = percent_decode(raw_value, true).map_err(|e| fail(e.0))?;
        let param = method
            .params
            .get(&key)
            .filter(|p| p.location == Location::Query)
            .or_else(|| doc.global_params.get(&key))
            .ok_or_else(|| {
                let mut known: Vec<&str> = method
                    .params
                    .iter()
                    .filter(|(_, p)| p.location == Location::Query)
                    .map(|(name, _)| name.as_str())
                    .collect();
                known.sort_unstable();
                fail(format!(
                    "unknown query parameter {key}{} (the method takes {})",
                    suggestion(&key, known.iter().copied()),
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ))
            })?;
        let count = seen.entry(key.clone()).or_insert(0);
        *count += 1;
        if *count > 1 && !param.repeated {
            return Err(fail(format!(
                "query parameter {key} is given more than once"
            )));
        }
        param.check(&key, &value, doc).map_err(fail)?;
    }
    for (name, param) in &method.params {
        if param.required && param.location == Location::Query && !seen.contains_key(name) {
            return Err(fail(format!("required query parameter {name} is missing")));
        }
    }

    match (&method.request, body) {
        (Some(schema), Some(body)) => {
            let checker = Checker {
                doc,
                request_of: Some(id),
            };
            checker
                .check_ref(schema, body, &root_label(schema))
                .map_err(fail)?;
        }
        (Some(schema), None) => {
            return Err(fail(format!("a request body ({schema}) is required")));
        }
        (None, Some(_)) => return Err(fail("the method takes no request body".to_string())),
        (None, None) => {}
    }
    Ok(id)
}

/// Checks a successful (2xx) response body against the method's response schema.
pub fn check_response(method_id: &str, body: &Value) -> Result<(), SchemaError> {
    let doc = discovery()?;
    let method = doc
        .methods
        .iter()
        .find(|m| m.id == method_id)
        .ok_or_else(|| SchemaError(format!("unknown compute method {method_id}")))?;
    let Some(schema) = &method.response else {
        return Err(SchemaError(format!(
            "{method_id}: the method has no response body"
        )));
    };
    let checker = Checker {
        doc,
        request_of: None,
    };
    checker
        .check_ref(schema, body, &root_label(schema))
        .map_err(|e| SchemaError(format!("{method_id} response: {e}")))
}

/// Checks an error response body (`{"error": {"code", "message", "errors": [...]}}`, the shape
/// Google's APIs answer with) for the given HTTP status.
pub fn check_error(status: u16, body: &Value) -> Result<(), SchemaError> {
    let fail = |message: String| SchemaError(format!("error body for status {status}: {message}"));
    if !(400..=599).contains(&status) {
        return Err(fail("not an error status".to_string()));
    }
    let top = body
        .as_object()
        .ok_or_else(|| fail(format!("expected an object, found {}", kind(body))))?;
    if let Some(key) = top.keys().find(|k| k.as_str() != "error") {
        return Err(fail(format!(
            "unknown top-level field {key} (only error is allowed)"
        )));
    }
    let error = top
        .get("error")
        .ok_or_else(|| fail("missing field error".to_string()))?;
    let error = error
        .as_object()
        .ok_or_else(|| fail(format!("error: expected an object, found {}", kind(error))))?;
    const FIELDS: [&str; 5] = ["code", "message", "errors", "status", "details"];
    if let Some(key) = error.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(fail(format!(
            "error.{key}: unknown field{} (expected one of {})",
            suggestion(key, FIELDS.iter().copied()),
            FIELDS.join(", ")
        )));
    }
    match error.get("code") {
        Some(code) if code.as_u64() == Some(u64::from(status)) => {}
        Some(code) => {
            return Err(fail(format!("error.code: expected {status}, found {code}")));
        }
        None => return Err(fail("error.code: missing".to_string())),
    }
    require_string(error, "message", "error").map_err(fail)?;
    let errors = match error.get("errors") {
        Some(Value::Array(errors)) if !errors.is_empty() => errors,
        Some(Value::Array(_)) => {
            return Err(fail(
                "error.errors: expected at least one entry".to_string(),
            ));
        }
        Some(other) => {
            return Err(fail(format!(
                "error.errors: expected an array, found {}",
                kind(other)
            )));
        }
        None => return Err(fail("error.errors: missing".to_string())),
    };
    const ITEM_FIELDS: [&str; 5] = ["message", "domain", "reason", "location", "locationType"];
    for (i, item) in errors.iter().enumerate() {
        let path = format!("error.errors[{i}]");
        let item = item
            .as_object()
            .ok_or_else(|| fail(format!("{path}: expected an object, found {}", kind(item))))?;
        if let Some(key) = item.keys().find(|k| !ITEM_FIELDS.contains(&k.as_str())) {
            return Err(fail(format!(
                "{path}.{key}: unknown field{} (expected one of {})",
                suggestion(key, ITEM_FIELDS.iter().copied()),
                ITEM_FIELDS.join(", ")
            )));
        }
        for field in ["message", "domain", "reason"] {
            require_string(item, field, &path).map_err(fail)?;
        }
        for field in ["location", "locationType"] {
            if let Some(value) = item.get(field)
                && !value.is_string()
            {
                return Err(fail(format!(
                    "{path}.{field}: expected a string, found {}",
                    kind(value)
                )));
            }
        }
    }
    if let Some(value) = error.get("status") {
        let name = value.as_str().ok_or_else(|| {
            fail(format!(
                "error.status: expected a string, found {}",
                kind(value)
            ))
        })?;
        let statuses = canonical_code_statuses(name).ok_or_else(|| {
            fail(format!(
                "error.status: {name} is not a google.rpc.Code name"
            ))
        })?;
        if !statuses.contains(&status) {
            return Err(fail(format!(
                "error.status: {name} does not go with HTTP status {status}"
            )));
        }
    }
    if let Some(value) = error.get("details") {
        let details = value.as_array().ok_or_else(|| {
            fail(format!(
                "error.details: expected an array, found {}",
                kind(value)
            ))
        })?;
        for (i, detail) in details.iter().enumerate() {
            if !detail.get("@type").is_some_and(Value::is_string) {
                return Err(fail(format!(
                    "error.details[{i}]: expected an object with a string @type"
                )));
            }
        }
    }
    Ok(())
}

/// The HTTP statuses a `google.rpc.Code` name is answered with (`google/rpc/code.proto`; 412 is
/// what Compute answers a fingerprint mismatch with).
fn canonical_code_statuses(name: &str) -> Option<&'static [u16]> {
    Some(match name {
        "CANCELLED" => &[499],
        "UNKNOWN" | "INTERNAL" | "DATA_LOSS" => &[500],
        "INVALID_ARGUMENT" | "OUT_OF_RANGE" => &[400],
        "FAILED_PRECONDITION" => &[400, 412],
        "DEADLINE_EXCEEDED" => &[504],
        "NOT_FOUND" => &[404],
        "ALREADY_EXISTS" => &[409],
        "ABORTED" => &[409, 412],
        "PERMISSION_DENIED" => &[403],
        "UNAUTHENTICATED" => &[401],
        "RESOURCE_EXHAUSTED" => &[429],
        "UNIMPLEMENTED" => &[501],
        "UNAVAILABLE" => &[503],
        _ => return None,
    })
}

fn require_string(object: &Map<String, Value>, field: &str, path: &str) -> Result<(), String> {
    match object.get(field) {
        Some(Value::String(_)) => Ok(()),
        Some(other) => Err(format!(
            "{path}.{field}: expected a string, found {}",
            kind(other)
        )),
        None => Err(format!("{path}.{field}: missing")),
    }
}

// ---------------------------------------------------------------------------------------------
// The parsed document.

/// The embedded, trimmed discovery document.
const DOCUMENT: &str = include_str!("discovery/compute-v1.json");

struct Discovery {
    /// `compute/v1/`.
    service_path: String,
    /// The standard query parameters every method takes (`alt`, `fields`, `prettyPrint`, ...).
    global_params: BTreeMap<String, Param>,
    methods: Vec<Method>,
    schemas: Map<String, Value>,
    /// Every `pattern` in the document, compiled.
    patterns: HashMap<String, Pattern>,
}

struct Method {
    id: String,
    http_method: String,
    segments: Vec<Segment>,
    params: BTreeMap<String, Param>,
    /// Schema names of the request and response bodies.
    request: Option<String>,
    response: Option<String>,
}

enum Segment {
    Literal(String),
    Param(String),
}

impl Method {
    fn matches(&self, segments: &[&str]) -> bool {
        self.segments.len() == segments.len()
            && self
                .segments
                .iter()
                .zip(segments)
                .all(|(template, segment)| match template {
                    Segment::Literal(literal) => literal == segment,
                    Segment::Param(_) => !segment.is_empty(),
                })
    }

    fn literal_segments(&self) -> usize {
        self.segments
            .iter()
            .filter(|s| matches!(s, Segment::Literal(_)))
            .count()
    }
}

#[derive(PartialEq, Eq)]
enum Location {
    Path,
    Query,
}

enum ParamType {
    String,
    Integer,
    Boolean,
}

struct Param {
    location: Location,
    ty: ParamType,
    format: Option<String>,
    required: bool,
    repeated: bool,
    enum_values: Option<Vec<String>>,
    pattern: Option<String>,
    minimum: Option<i64>,
    maximum: Option<i64>,
}

impl Param {
    fn parse(name: &str, value: &Value) -> Result<Param, String> {
        let text = |key: &str| value.get(key).and_then(Value::as_str);
        let bound = |key: &str| -> Result<Option<i64>, String> {
            text(key)
                .map(|b| {
                    b.parse::<i64>()
                        .map_err(|_| format!("parameter {name}: bad {key} {b}"))
                })
                .transpose()
        };
        Ok(Param {
            location: match text("location") {
                Some("path") => Location::Path,
                Some("query") => Location::Query,
                other => return Err(format!("parameter {name}: unsupported location {other:?}")),
            },
            ty: match text("type") {
                Some("string") => ParamType::String,
                Some("integer") => ParamType::Integer,
                Some("boolean") => ParamType::Boolean,
                other => return Err(format!("parameter {name}: unsupported type {other:?}")),
            },
            format: text("format").map(str::to_string),
            required: value
                .get("required")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            repeated: value
                .get("repeated")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            enum_values: value.get("enum").and_then(Value::as_array).map(|values| {
                values
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            }),
            pattern: text("pattern").map(str::to_string),
            minimum: bound("minimum")?,
            maximum: bound("maximum")?,
        })
    }

    /// Checks one (decoded) value of the parameter.
    fn check(&self, name: &str, value: &str, doc: &Discovery) -> Result<(), String> {
        let what = match self.location {
            Location::Path => "path parameter",
            Location::Query => "query parameter",
        };
        match self.ty {
            ParamType::String => {}
            ParamType::Boolean => {
                if value != "true" && value != "false" {
                    return Err(format!("{what} {name}={value:?}: expected true or false"));
                }
            }
            ParamType::Integer => {
                let n: i64 = value
                    .parse()
                    .map_err(|_| format!("{what} {name}={value:?}: expected an integer"))?;
                let (low, high) = integer_range(self.format.as_deref());
                let low = self.minimum.map_or(low, |m| m.max(low));
                let high = self.maximum.map_or(high, |m| m.min(high));
                if n < low || n > high {
                    return Err(format!(
                        "{what} {name}={value}: expected an integer from {low} to {high}"
                    ));
                }
            }
        }
        if let Some(values) = &self.enum_values
            && !values.iter().any(|v| v == value)
        {
            return Err(format!(
                "{what} {name}={value:?}: expected one of {}",
                values.join(", ")
            ));
        }
        if let Some(pattern) = &self.pattern
            && !doc.pattern_matches(pattern, value)?
        {
            return Err(format!("{what} {name}={value:?}: does not match {pattern}"));
        }
        Ok(())
    }
}

/// The range of an `integer` of the given discovery `format`.
fn integer_range(format: Option<&str>) -> (i64, i64) {
    match format {
        Some("int32") => (i64::from(i32::MIN), i64::from(i32::MAX)),
        Some("uint32") => (0, i64::from(u32::MAX)),
        _ => (i64::MIN, i64::MAX),
    }
}

impl Discovery {
    fn parse(text: &str) -> Result<Discovery, String> {
        let doc: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let str_at = |key: &str| {
            doc.get(key)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| format!("no {key}"))
        };
        let service_path = str_at("servicePath")?;
        let mut global_params = BTreeMap::new();
        for (name, value) in doc
            .get("parameters")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            global_params.insert(name.clone(), Param::parse(name, value)?);
        }
        let schemas = doc
            .get("schemas")
            .and_then(Value::as_object)
            .cloned()
            .ok_or("no schemas")?;

        let mut methods = Vec::new();
        let resources = doc
            .get("resources")
            .and_then(Value::as_object)
            .ok_or("no resources")?;
        for resource in resources.values() {
            let resource_methods = resource.get("methods").and_then(Value::as_object);
            for (name, method) in resource_methods.into_iter().flatten() {
                methods.push(Method::parse(name, method)?);
            }
        }

        let mut discovery = Discovery {
            service_path,
            global_params,
            methods,
            schemas,
            patterns: HashMap::new(),
        };
        // Compile every pattern and check every schema node once, so that a document the
        // checker cannot fully understand fails loudly rather than passing bodies unchecked.
        let mut sources = Vec::new();
        collect_patterns(&doc, &mut sources);
        for source in sources {
            let compiled =
                Pattern::compile(&source).map_err(|e| format!("pattern {source}: {e}"))?;
            discovery.patterns.insert(source, compiled);
        }
        for (name, schema) in &discovery.schemas {
            discovery
                .validate_schema(schema)
                .map_err(|e| format!("schema {name}: {e}"))?;
        }
        for method in &discovery.methods {
            for schema in method.request.iter().chain(&method.response) {
                if !discovery.schemas.contains_key(schema) {
                    return Err(format!("{}: unknown schema {schema}", method.id));
                }
            }
        }
        Ok(discovery)
    }

    /// Checks that the checker understands a schema node: a `$ref` that resolves, or a known
    /// `type` (and `format`), recursively.
    fn validate_schema(&self, schema: &Value) -> Result<(), String> {
        if let Some(name) = schema.get("$ref") {
            let name = name.as_str().ok_or("$ref is not a string")?;
            return match self.schemas.contains_key(name) {
                true => Ok(()),
                false => Err(format!("$ref {name} is not defined")),
            };
        }
        let ty = schema
            .get("type")
            .and_then(Value::as_str)
            .ok_or("a node without type")?;
        let format = schema.get("format").and_then(Value::as_str);
        match (ty, format) {
            ("any" | "boolean", None)
            | ("number", None | Some("double" | "float"))
            | ("integer", None | Some("int32" | "uint32"))
            | ("array", None)
            | ("object", None | Some("google.protobuf.Any")) => {}
            ("string", None | Some("int64" | "uint64" | "byte"))
            | ("string", Some("google-datetime" | "google-duration")) => {}
            (ty, format) => return Err(format!("unsupported type {ty} format {format:?}")),
        }
        if ty == "array" {
            self.validate_schema(schema.get("items").ok_or("an array without items")?)?;
        }
        if let Some(properties) = schema.get("properties") {
            let properties = properties
                .as_object()
                .ok_or("properties is not an object")?;
            for (name, property) in properties {
                self.validate_schema(property)
                    .map_err(|e| format!("{name}: {e}"))?;
            }
        }
        if let Some(additional) = schema.get("additionalProperties") {
            self.validate_schema(additional)?;
        }
        Ok(())
    }

    fn pattern_matches(&self, pattern: &str, value: &str) -> Result<bool, String> {
        self.patterns
            .get(pattern)
            .map(|p| p.is_match(value))
            .ok_or_else(|| format!("pattern {pattern} was not compiled"))
    }
}

impl Method {
    fn parse(name: &str, value: &Value) -> Result<Method, String> {
        let text = |key: &str| {
            value
                .get(key)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| format!("method {name}: no {key}"))
        };
        let id = text("id")?;
        let template = value
            .get("flatPath")
            .or_else(|| value.get("path"))
            .and_then(Value::as_str)
            .ok_or_else(|| format!("{id}: no path"))?;
        let segments = template
            .split('/')
            .map(
                |segment| match segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                    Some(name) if name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') => {
                        Ok(Segment::Param(name.to_string()))
                    }
                    Some(_) => Err(format!("{id}: unsupported path template segment {segment}")),
                    None if segment.contains(['{', '}']) => {
                        Err(format!("{id}: unsupported path template segment {segment}"))
                    }
                    None => Ok(Segment::Literal(segment.to_string())),
                },
            )
            .collect::<Result<Vec<_>, _>>()?;
        let mut params = BTreeMap::new();
        for (param, spec) in value
            .get("parameters")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            params.insert(
                param.clone(),
                Param::parse(param, spec).map_err(|e| format!("{id}: {e}"))?,
            );
        }
        for segment in &segments {
            if let Segment::Param(param) = segment
                && params
                    .get(param)
                    .is_none_or(|p| p.location != Location::Path)
            {
                return Err(format!(
                    "{id}: path segment {param} is not a path parameter"
                ));
            }
        }
        let schema_ref = |key: &str| -> Result<Option<String>, String> {
            match value.get(key) {
                None => Ok(None),
                Some(body) => body
                    .get("$ref")
                    .and_then(Value::as_str)
                    .map(|s| Some(s.to_string()))
                    .ok_or_else(|| format!("{id}: {key} without $ref")),
            }
        };
        Ok(Method {
            http_method: text("httpMethod")?,
            segments,
            params,
            request: schema_ref("request")?,
            response: schema_ref("response")?,
            id,
        })
    }
}

fn collect_patterns(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                match (key.as_str(), child) {
                    ("pattern", Value::String(pattern)) => {
                        if !out.contains(pattern) {
                            out.push(pattern.clone());
                        }
                    }
                    _ => collect_patterns(child, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| collect_patterns(item, out)),
        _ => {}
    }
}

/// The parsed document, or why the embedded one could not be parsed.
fn discovery() -> Result<&'static Discovery, SchemaError> {
    static DISCOVERY: OnceLock<Result<Discovery, String>> = OnceLock::new();
    DISCOVERY
        .get_or_init(|| Discovery::parse(DOCUMENT))
        .as_ref()
        .map_err(|e| SchemaError(format!("the embedded discovery document is unusable: {e}")))
}

// ---------------------------------------------------------------------------------------------
// Checking JSON values against discovery schemas.

struct Checker<'a> {
    doc: &'a Discovery,
    /// When checking a request body: the method id, for `annotations.required`.
    request_of: Option<&'a str>,
}

impl Checker<'_> {
    fn check_ref(&self, name: &str, value: &Value, path: &str) -> Result<(), String> {
        let schema = self
            .doc
            .schemas
            .get(name)
            .ok_or_else(|| format!("{path}: unknown schema {name}"))?;
        self.check(schema, value, path)
    }

    fn check(&self, schema: &Value, value: &Value, path: &str) -> Result<(), String> {
        if let Some(name) = schema.get("$ref").and_then(Value::as_str) {
            return self.check_ref(name, value, path);
        }
        let ty = schema.get("type").and_then(Value::as_str).unwrap_or("any");
        let format = schema.get("format").and_then(Value::as_str);
        let mismatch =
            |expected: &str| format!("{path}: expected {expected}, found {}", kind(value));
        match ty {
            "any" => Ok(()),
            "boolean" => value
                .is_boolean()
                .then_some(())
                .ok_or_else(|| mismatch("a boolean")),
            "number" => value
                .is_number()
                .then_some(())
                .ok_or_else(|| mismatch("a number")),
            "integer" => {
                let (low, high) = integer_range(format);
                let expected = format!("an integer ({})", format.unwrap_or("int64"));
                match value.as_i64() {
                    Some(n) if (low..=high).contains(&n) => Ok(()),
                    Some(n) => Err(format!("{path}: {n} is out of range for {expected}")),
                    None => Err(mismatch(&expected)),
                }
            }
            "string" => self.check_string(schema, format, value, path),
            "array" => {
                let items = value.as_array().ok_or_else(|| mismatch("an array"))?;
                let item_schema = schema.get("items").unwrap_or(&Value::Null);
                for (i, item) in items.iter().enumerate() {
                    self.check(item_schema, item, &format!("{path}[{i}]"))?;
                }
                Ok(())
            }
            "object" => self.check_object(schema, value, path),
            other => Err(format!("{path}: the schema has unsupported type {other}")),
        }
    }

    fn check_string(
        &self,
        schema: &Value,
        format: Option<&str>,
        value: &Value,
        path: &str,
    ) -> Result<(), String> {
        match format {
            // 64-bit integers travel as decimal strings; Google also accepts JSON numbers.
            Some(f @ ("int64" | "uint64")) => {
                let ok = match value {
                    Value::String(s) if f == "int64" => s.parse::<i64>().is_ok(),
                    Value::String(s) => s.parse::<u64>().is_ok(),
                    Value::Number(n) if f == "int64" => n.as_i64().is_some(),
                    Value::Number(n) => n.as_u64().is_some(),
                    _ => false,
                };
                if !ok {
                    return Err(format!(
                        "{path}: expected an {f} as a decimal string, found {}",
                        describe(value)
                    ));
                }
                return Ok(());
            }
            Some("byte") => {
                let s = value.as_str().ok_or_else(|| {
                    format!("{path}: expected a base64 string, found {}", kind(value))
                })?;
                if !is_base64(s) {
                    return Err(format!("{path}: expected base64, found {s:?}"));
                }
                return Ok(());
            }
            _ => {}
        }
        let s = value
            .as_str()
            .ok_or_else(|| format!("{path}: expected a string, found {}", kind(value)))?;
        if let Some(values) = schema.get("enum").and_then(Value::as_array)
            && !values.iter().any(|v| v.as_str() == Some(s))
        {
            let names: Vec<&str> = values.iter().filter_map(Value::as_str).collect();
            return Err(format!("{path}: {s:?} is not one of {}", names.join(", ")));
        }
        if let Some(pattern) = schema.get("pattern").and_then(Value::as_str)
            && !self.doc.pattern_matches(pattern, s)?
        {
            return Err(format!("{path}: {s:?} does not match {pattern}"));
        }
        Ok(())
    }

    fn check_object(&self, schema: &Value, value: &Value, path: &str) -> Result<(), String> {
        let object = value
            .as_object()
            .ok_or_else(|| format!("{path}: expected an object, found {}", kind(value)))?;
        let properties = schema.get("properties").and_then(Value::as_object);
        let additional = schema.get("additionalProperties");
        for (key, child) in object {
            if let Some(property) = properties.and_then(|p| p.get(key)) {
                if !child.is_null() {
                    self.check(property, child, &format!("{path}.{key}"))?;
                }
            } else if let Some(additional) = additional {
                self.check(additional, child, &format!("{path}[{key:?}]"))?;
            } else {
                let known = properties
                    .into_iter()
                    .flat_map(|p| p.keys().map(String::as_str));
                return Err(format!(
                    "{path}.{key}: unknown field{}",
                    suggestion(key, known)
                ));
            }
        }
        if let (Some(method), Some(properties)) = (self.request_of, properties) {
            for (name, property) in properties {
                let required = property
                    .pointer("/annotations/required")
                    .and_then(Value::as_array)
                    .is_some_and(|ids| ids.iter().any(|id| id.as_str() == Some(method)));
                if required && object.get(name).is_none_or(Value::is_null) {
                    return Err(format!("{path}.{name}: required by {method} but missing"));
                }
            }
        }
        Ok(())
    }
}

/// The schema name as the root of a JSON path: `Instance` -> `instance`.
fn root_label(schema: &str) -> String {
    let mut chars = schema.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// What kind of JSON value this is, for messages.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A scalar with its value, anything else by its kind.
fn describe(value: &Value) -> String {
    match value {
        Value::Number(_) | Value::String(_) | Value::Bool(_) => value.to_string(),
        other => kind(other).to_string(),
    }
}

/// Standard or URL-safe base64, padding optional (what Google accepts for `format: byte`).
fn is_base64(s: &str) -> bool {
    let body = s.trim_end_matches('=');
    s.len() - body.len() <= 2
        && body.len() % 4 != 1
        && (s.len() == body.len() || s.len().is_multiple_of(4))
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'-' | b'_'))
}

/// ` (did you mean X?)` for the closest known name within a small edit distance, else empty.
fn suggestion<'a>(name: &str, known: impl Iterator<Item = &'a str>) -> String {
    known
        .map(|k| (edit_distance(name, k), k))
        .filter(|(d, _)| *d <= 2 || *d * 3 <= name.len())
        .min()
        .map(|(_, k)| format!(" (did you mean {k}?)"))
        .unwrap_or_default()
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

/// Decodes `%XX` escapes (and `+` as a space in query strings); the result must be UTF-8.
fn percent_decode(s: &str, plus_is_space: bool) -> Result<String, SchemaError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| SchemaError(format!("bad percent-encoding in {s:?}")))?;
                out.push(hex);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| SchemaError(format!("{s:?} does not decode to UTF-8")))
}

// ---------------------------------------------------------------------------------------------
// The regular expressions of the document's `pattern`s.
//
// Exactly the constructs the kept methods' patterns use: literal characters, `\` escapes of
// punctuation (`\.`), the class `\S`, bracket classes with ranges (`[-a-z0-9]`, `[a-zA-Z0-9-_]`,
// a `-` first, last or right after a range is literal), non-capturing groups `(?:...)`,
// alternation `|`, and the quantifiers `?`, `*`, `{n}` and `{m,n}`. Anything else (`.`, `+`,
// `^`, `$`, `[^...]`, capturing groups, other escapes) is a compile error, so a new construct in
// a regenerated document is noticed by the tests instead of being misread. A pattern must match
// the whole value. Matching runs the compiled automaton over all states at once (Thompson), so
// time is linear in the value's length whatever the pattern.

/// A compiled pattern.
#[derive(Debug)]
struct Pattern {
    program: Vec<Inst>,
}

#[derive(Debug, Clone)]
enum ClassItem {
    Range(char, char),
    NotSpace,
}

impl ClassItem {
    fn contains(&self, c: char) -> bool {
        match self {
            ClassItem::Range(low, high) => (*low..=*high).contains(&c),
            ClassItem::NotSpace => !c.is_whitespace(),
        }
    }
}

#[derive(Debug)]
enum Node {
    Class(Vec<ClassItem>),
    Concat(Vec<Node>),
    Alt(Vec<Node>),
    Repeat(Box<Node>, u32, Option<u32>),
}

#[derive(Debug)]
enum Inst {
    Class(Vec<ClassItem>),
    Split(usize, usize),
    Jmp(usize),
    Match,
}

/// Bounds on what a pattern may expand to.
const MAX_REPEAT: u32 = 1000;
const MAX_PROGRAM: usize = 100_000;

impl Pattern {
    fn compile(source: &str) -> Result<Pattern, String> {
        let mut parser = Parser {
            chars: source.chars().collect(),
            pos: 0,
        };
        let node = parser.alternation()?;
        if let Some(c) = parser.peek() {
            return Err(format!("unexpected {c:?} at {}", parser.pos));
        }
        let mut program = Vec::new();
        emit(&node, &mut program)?;
        program.push(Inst::Match);
        Ok(Pattern { program })
    }

    fn is_match(&self, value: &str) -> bool {
        let mut current = Vec::new();
        let mut next = Vec::new();
        let mut mark = vec![usize::MAX; self.program.len()];
        self.add(&mut current, &mut mark, 0, 0);
        for (step, c) in value.chars().enumerate() {
            next.clear();
            for &pc in &current {
                if let Inst::Class(items) = &self.program[pc]
                    && items.iter().any(|item| item.contains(c))
                {
                    self.add(&mut next, &mut mark, pc + 1, step + 1);
                }
            }
            std::mem::swap(&mut current, &mut next);
            if current.is_empty() {
                return false;
            }
        }
        current
            .iter()
            .any(|&pc| matches!(self.program[pc], Inst::Match))
    }

    /// Adds `pc` and everything reachable from it without input to `states`.
    fn add(&self, states: &mut Vec<usize>, mark: &mut [usize], pc: usize, step: usize) {
        let mut stack = vec![pc];
        while let Some(pc) = stack.pop() {
            if mark[pc] == step {
                continue;
            }
            mark[pc] = step;
            match self.program[pc] {
                Inst::Split(a, b) => {
                    stack.push(b);
                    stack.push(a);
                }
                Inst::Jmp(target) => stack.push(target),
                Inst::Class(_) | Inst::Match => states.push(pc),
            }
        }
    }
}

fn emit(node: &Node, program: &mut Vec<Inst>) -> Result<(), String> {
    if program.len() > MAX_PROGRAM {
        return Err("the pattern expands too far".to_string());
    }
    match node {
        Node::Class(items) => program.push(Inst::Class(items.clone())),
        Node::Concat(nodes) => {
            for node in nodes {
                emit(node, program)?;
            }
        }
        Node::Alt(alternatives) => {
            let mut jumps = Vec::new();
            for (i, alternative) in alternatives.iter().enumerate() {
                if i + 1 == alternatives.len() {
                    emit(alternative, program)?;
                } else {
                    let split = program.len();
                    program.push(Inst::Split(split + 1, 0));
                    emit(alternative, program)?;
                    jumps.push(program.len());
                    program.push(Inst::Jmp(0));
                    let next = program.len();
                    program[split] = Inst::Split(split + 1, next);
                }
            }
            let end = program.len();
            for jump in jumps {
                program[jump] = Inst::Jmp(end);
            }
        }
        Node::Repeat(node, min, max) => {
            for _ in 0..*min {
                emit(node, program)?;
            }
            match max {
                None => {
                    let split = program.len();
                    program.push(Inst::Split(split + 1, 0));
                    emit(node, program)?;
                    program.push(Inst::Jmp(split));
                    let end = program.len();
                    program[split] = Inst::Split(split + 1, end);
                }
                Some(max) => {
                    let mut splits = Vec::new();
                    for _ in *min..*max {
                        splits.push(program.len());
                        program.push(Inst::Split(program.len() + 1, 0));
                        emit(node, program)?;
                    }
                    let end = program.len();
                    for split in splits {
                        program[split] = Inst::Split(split + 1, end);
                    }
                }
            }
        }
    }
    Ok(())
}

struct Parser {
    chars: Vec<char>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<char> {
        let c = self.peek();
        self.pos += usize::from(c.is_some());
        c
    }

    fn alternation(&mut self) -> Result<Node, String> {
        let mut alternatives = vec![self.concatenation()?];
        while self.peek() == Some('|') {
            self.pos += 1;
            alternatives.push(self.concatenation()?);
        }
        Ok(match alternatives.len() {
            1 => alternatives.remove(0),
            _ => Node::Alt(alternatives),
        })
    }

    fn concatenation(&mut self) -> Result<Node, String> {
        let mut nodes = Vec::new();
        while let Some(c) = self.peek() {
            if c == '|' || c == ')' {
                break;
            }
            let atom = self.atom()?;
            nodes.push(self.quantified(atom)?);
        }
        Ok(Node::Concat(nodes))
    }

    fn quantified(&mut self, atom: Node) -> Result<Node, String> {
        let (min, max) = match self.peek() {
            Some('?') => (0, Some(1)),
            Some('*') => (0, None),
            Some('{') => {
                self.pos += 1;
                let min = self.number()?;
                let max = match self.next() {
                    Some('}') => return self.after_quantifier(atom, min, Some(min)),
                    Some(',') => self.number()?,
                    _ => return Err(format!("bad counted repetition at {}", self.pos)),
                };
                if self.next() != Some('}') || max < min {
                    return Err(format!("bad counted repetition at {}", self.pos));
                }
                return self.after_quantifier(atom, min, Some(max));
            }
            _ => return Ok(atom),
        };
        self.pos += 1;
        self.after_quantifier(atom, min, max)
    }

    fn after_quantifier(&mut self, atom: Node, min: u32, max: Option<u32>) -> Result<Node, String> {
        if matches!(self.peek(), Some('?' | '*' | '+' | '{')) {
            return Err(format!("unsupported repeated quantifier at {}", self.pos));
        }
        Ok(Node::Repeat(Box::new(atom), min, max))
    }

    fn number(&mut self) -> Result<u32, String> {
        let start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
        }
        let digits: String = self.chars[start..self.pos].iter().collect();
        match digits.parse::<u32>() {
            Ok(n) if n <= MAX_REPEAT => Ok(n),
            _ => Err(format!("bad repetition count at {start}")),
        }
    }

    fn atom(&mut self) -> Result<Node, String> {
        let at = self.pos;
        match self.next() {
            Some('(') => {
                if self.next() != Some('?') || self.next() != Some(':') {
                    return Err(format!(
                        "only non-capturing groups (?:...) are supported, at {at}"
                    ));
                }
                let inner = self.alternation()?;
                if self.next() != Some(')') {
                    return Err(format!("unclosed group opened at {at}"));
                }
                Ok(inner)
            }
            Some('[') => self.class(),
            Some('\\') => match self.next() {
                Some('S') => Ok(Node::Class(vec![ClassItem::NotSpace])),
                Some(c) if c.is_ascii_punctuation() => {
                    Ok(Node::Class(vec![ClassItem::Range(c, c)]))
                }
                other => Err(format!(
                    "unsupported escape \\{} at {at}",
                    other.unwrap_or(' ')
                )),
            },
            Some(c @ ('.' | '+' | '^' | '$' | '?' | '*' | '{' | '}' | ']')) => {
                Err(format!("unsupported {c:?} at {at}"))
            }
            Some(c) => Ok(Node::Class(vec![ClassItem::Range(c, c)])),
            None => Err("unexpected end".to_string()),
        }
    }

    fn class(&mut self) -> Result<Node, String> {
        let open = self.pos - 1;
        if self.peek() == Some('^') {
            return Err(format!("negated classes are not supported, at {open}"));
        }
        let mut items = Vec::new();
        loop {
            let c = match self.next() {
                None => return Err(format!("unclosed class opened at {open}")),
                Some(']') if !items.is_empty() => return Ok(Node::Class(items)),
                Some(c @ ('\\' | '[')) => {
                    return Err(format!("unsupported {c:?} in a class at {}", self.pos - 1));
                }
                Some(c) => c,
            };
            let is_range =
                self.peek() == Some('-') && self.chars.get(self.pos + 1).is_some_and(|&n| n != ']');
            if is_range {
                self.pos += 1;
                let high = self.next().unwrap_or(c);
                if high == '\\' || high == '[' || high < c {
                    return Err(format!("bad class range {c}-{high} at {}", self.pos - 1));
                }
                items.push(ClassItem::Range(c, high));
            } else {
                items.push(ClassItem::Range(c, c));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const INSERT_PATH: &str = "/compute/v1/projects/my-project/zones/us-east1-b/instances";

    fn instance() -> Value {
        let zone = "https://www.googleapis.com/compute/v1/projects/my-project/zones/us-east1-b";
        json!({
            "name": "c1-cp-0",
            "machineType": format!("{zone}/machineTypes/e2-standard-4"),
            "labels": {"clusterctl-cluster": "c1", "clusterctl-role": "control-plane"},
            "disks": [
                {
                    "boot": true,
                    "autoDelete": true,
                    "type": "PERSISTENT",
                    "mode": "READ_WRITE",
                    "deviceName": "boot",
                    "initializeParams": {
                        "sourceImage": "projects/my-project/global/images/clusterctl-node-1-31-2",
                        "diskSizeGb": "50",
                        "diskType": format!("{zone}/diskTypes/pd-balanced"),
                        "labels": {"clusterctl-cluster": "c1"}
                    }
                },
                {
                    "boot": false,
                    "autoDelete": false,
                    "deviceName": "etcd",
                    "source": "projects/my-project/zones/us-east1-b/disks/c1-cp-0-etcd"
                }
            ],
            "networkInterfaces": [{
                "network": "projects/my-project/global/networks/c1",
                "subnetwork": "projects/my-project/regions/us-east1/subnetworks/c1",
                "accessConfigs": [{
                    "name": "External NAT",
                    "type": "ONE_TO_ONE_NAT",
                    "networkTier": "PREMIUM"
                }]
            }],
            "metadata": {"items": [
                {"key": "user-data", "value": "#cloud-config\n"},
                {"key": "clusterctl-node", "value": "cp-0"}
            ]},
            "tags": {"items": ["c1-node"]},
            "canIpForward": true,
            "serviceAccounts": [{
                "email": "default",
                "scopes": ["https://www.googleapis.com/auth/cloud-platform"]
            }]
        })
    }

    fn operation() -> Value {
        let zone = "https://www.googleapis.com/compute/v1/projects/my-project/zones/us-east1-b";
        json!({
            "kind": "compute#operation",
            "id": "7127550864823803201",
            "name": "operation-1762790400000-5f1c2a-1d2e3f4a-8b9c0d1e",
            "zone": zone,
            "operationType": "insert",
            "targetLink": format!("{zone}/instances/c1-cp-0"),
            "targetId": "3481236129874512213",
            "status": "RUNNING",
            "user": "clusterctl@my-project.iam.gserviceaccount.com",
            "progress": 0,
            "insertTime": "2026-11-10T08:00:00.000-08:00",
            "startTime": "2026-11-10T08:00:00.512-08:00",
            "selfLink": format!("{zone}/operations/operation-1762790400000-5f1c2a-1d2e3f4a-8b9c0d1e")
        })
    }

    fn error_of(result: Result<impl std::fmt::Debug, SchemaError>) -> String {
        match result {
            Ok(value) => panic!("expected an error, got {value:?}"),
            Err(SchemaError(message)) => message,
        }
    }

    #[test]
    fn document_loads() {
        let doc = discovery().expect("the embedded document parses");
        assert_eq!(doc.service_path, "compute/v1/");
        assert_eq!(doc.methods.len(), 41);
    }

    #[test]
    fn realistic_insert_passes() {
        let path = format!("{INSERT_PATH}?requestId=4b0a3c55-1f0e-4f62-9d7e-2d6f1c0b9a11");
        let id = check_request("POST", &path, Some(&instance())).expect("valid insert");
        assert_eq!(id, "compute.instances.insert");
    }

    #[test]
    fn list_with_encoded_filter_and_standard_parameters_passes() {
        let path = "/compute/v1/projects/my-project/zones/us-east1-b/instances\
                    ?filter=labels.clusterctl-cluster%3D%22c1%22&maxResults=500\
                    &pageToken=abc+def&alt=json&prettyPrint=false&%24.xgafv=2";
        assert_eq!(
            check_request("GET", path, None),
            Ok("compute.instances.list")
        );
    }

    #[test]
    fn methods_are_told_apart_by_path_and_verb() {
        let base = "/compute/v1/projects/my-project";
        let cases = [
            (
                "GET",
                format!("{base}/global/images/family/clusterctl-node"),
                "compute.images.getFromFamily",
            ),
            (
                "GET",
                format!("{base}/global/images/clusterctl-node-1"),
                "compute.images.get",
            ),
            (
                "DELETE",
                format!("{base}/zones/us-east1-b/instances/c1-cp-0"),
                "compute.instances.delete",
            ),
            (
                "POST",
                format!("{base}/zones/us-east1-b/operations/operation-1/wait"),
                "compute.zoneOperations.wait",
            ),
            (
                "GET",
                format!("{base}/regions/us-east1/subnetworks/c1?views=DEFAULT"),
                "compute.subnetworks.get",
            ),
            (
                "GET",
                format!("{base}/zones/us-east1-b"),
                "compute.zones.get",
            ),
        ];
        for (verb, path, expected) in cases {
            assert_eq!(
                check_request(verb, &path, None),
                Ok(expected),
                "{verb} {path}"
            );
        }
        let stop = format!("{base}/zones/us-east1-b/instances/c1-cp-0/stop");
        let error = error_of(check_request(
            "POST",
            &format!("{stop}?discardLocalSsd=yes"),
            None,
        ));
        assert!(
            error.contains("discardLocalSsd=\"yes\": expected true or false"),
            "{error}"
        );
        let error = error_of(check_request(
            "PUT",
            &format!("{base}/zones/us-east1-b/instances/x"),
            None,
        ));
        assert!(error.contains("GET for compute.instances.get"), "{error}");
    }

    #[test]
    fn misspelled_field_is_rejected_with_its_path() {
        let mut body = instance();
        let params = &mut body["disks"][0]["initializeParams"];
        let image = params["sourceImage"].take();
        params
            .as_object_mut()
            .expect("object")
            .remove("sourceImage");
        params["sourceImag"] = image;
        let error = error_of(check_request("POST", INSERT_PATH, Some(&body)));
        assert!(
            error.contains("instance.disks[0].initializeParams.sourceImag: unknown field"),
            "{error}"
        );
        assert!(error.contains("did you mean sourceImage?"), "{error}");
    }

    #[test]
    fn wrong_types_are_rejected() {
        let mut body = instance();
        body["canIpForward"] = json!("yes");
        let error = error_of(check_request("POST", INSERT_PATH, Some(&body)));
        assert!(
            error.contains("instance.canIpForward: expected a boolean, found a string"),
            "{error}"
        );

        let mut body = instance();
        body["disks"][0]["initializeParams"]["diskSizeGb"] = json!("fifty");
        let error = error_of(check_request("POST", INSERT_PATH, Some(&body)));
        assert!(
            error.contains("instance.disks[0].initializeParams.diskSizeGb"),
            "{error}"
        );

        let mut body = instance();
        body["labels"]["clusterctl-cluster"] = json!(1);
        let error = error_of(check_request("POST", INSERT_PATH, Some(&body)));
        assert!(
            error.contains("instance.labels[\"clusterctl-cluster\"]: expected a string"),
            "{error}"
        );

        let mut body = instance();
        body["disks"][0]["type"] = json!("EPHEMERAL");
        let error = error_of(check_request("POST", INSERT_PATH, Some(&body)));
        assert!(
            error.contains("is not one of PERSISTENT, SCRATCH"),
            "{error}"
        );
    }

    #[test]
    fn int64_accepts_decimal_strings_and_numbers() {
        let mut body = instance();
        body["disks"][0]["initializeParams"]["diskSizeGb"] = json!(50);
        assert!(check_request("POST", INSERT_PATH, Some(&body)).is_ok());
        body["disks"][0]["initializeParams"]["diskSizeGb"] = json!(50.5);
        assert!(check_request("POST", INSERT_PATH, Some(&body)).is_err());
    }

    #[test]
    fn required_body_fields_are_checked() {
        let mut body = instance();
        body.as_object_mut().expect("object").remove("name");
        let error = error_of(check_request("POST", INSERT_PATH, Some(&body)));
        assert!(
            error.contains("instance.name: required by compute.instances.insert"),
            "{error}"
        );

        let mut body = instance();
        body["name"] = json!("C1_CP");
        let error = error_of(check_request("POST", INSERT_PATH, Some(&body)));
        assert!(
            error.contains("instance.name: \"C1_CP\" does not match"),
            "{error}"
        );
    }

    #[test]
    fn unknown_query_parameter_is_rejected() {
        let path = format!("{INSERT_PATH}?requestId=abc&requestID=abc");
        let error = error_of(check_request("POST", &path, Some(&instance())));
        assert!(
            error.contains("unknown query parameter requestID (did you mean requestId?)"),
            "{error}"
        );
    }

    #[test]
    fn query_parameter_types_are_checked() {
        let list = "/compute/v1/projects/my-project/zones/us-east1-b/instances";
        for (query, expected) in [
            ("maxResults=-1", "expected an integer from 0 to 4294967295"),
            ("maxResults=ten", "expected an integer"),
            ("prettyPrint=yes", "expected true or false"),
            ("alt=xml", "expected one of json, media, proto"),
            ("filter=%zz", "bad percent-encoding"),
            ("maxResults=1&maxResults=2", "more than once"),
        ] {
            let error = error_of(check_request("GET", &format!("{list}?{query}"), None));
            assert!(error.contains(expected), "{query}: {error}");
        }
    }

    #[test]
    fn unmatched_paths_are_rejected() {
        for (verb, path) in [
            ("GET", "/compute/v1/projects/my-project/instances"),
            ("POST", "/compute/v1/projects/my-project/zones/us-east1-b"),
            ("GET", "/compute/v1/projects/my-project/zones//instances"),
            (
                "GET",
                "/compute/v1/projects/my-project/zones/us-east1-b/instances/",
            ),
            (
                "GET",
                "/compute/beta/projects/my-project/zones/us-east1-b/instances",
            ),
            (
                "GET",
                "/compute/v1/projects/my-project/zones/us-east1-b/machines",
            ),
        ] {
            assert!(check_request(verb, path, None).is_err(), "{path}");
        }
    }

    #[test]
    fn invalid_zone_name_is_rejected() {
        let path = "/compute/v1/projects/my-project/zones/US_East1/instances";
        let error = error_of(check_request("POST", path, Some(&instance())));
        assert!(
            error.contains("path parameter zone=\"US_East1\": does not match"),
            "{error}"
        );
    }

    #[test]
    fn body_presence_follows_the_method() {
        let get = "/compute/v1/projects/my-project/zones/us-east1-b/instances/c1-cp-0";
        let error = error_of(check_request("GET", get, Some(&json!({}))));
        assert!(
            error.contains("compute.instances.get: the method takes no request body"),
            "{error}"
        );
        let error = error_of(check_request("POST", INSERT_PATH, None));
        assert!(
            error.contains("a request body (Instance) is required"),
            "{error}"
        );
    }

    #[test]
    fn operation_response_passes_and_invented_field_fails() {
        assert_eq!(
            check_response("compute.zoneOperations.get", &operation()),
            Ok(())
        );
        let mut done = operation();
        done["status"] = json!("DONE");
        done["progress"] = json!(100);
        done["endTime"] = json!("2026-11-10T08:00:21.000-08:00");
        done["error"] = json!({"errors": [{
            "code": "ZONE_RESOURCE_POOL_EXHAUSTED",
            "message": "The zone does not have enough resources available",
        }]});
        assert_eq!(check_response("compute.instances.insert", &done), Ok(()));

        let mut invented = operation();
        invented["percentDone"] = json!(10);
        let error = error_of(check_response("compute.zoneOperations.get", &invented));
        assert!(
            error.contains("operation.percentDone: unknown field"),
            "{error}"
        );
        let error = error_of(check_response("compute.instances.frobnicate", &operation()));
        assert!(error.contains("unknown compute method"), "{error}");
    }

    #[test]
    fn error_bodies_are_checked() {
        let not_found = json!({"error": {
            "code": 404,
            "message": "The resource 'projects/my-project/zones/us-east1-b/instances/x' was not found",
            "errors": [{"message": "The resource was not found", "domain": "global", "reason": "notFound"}],
            "status": "NOT_FOUND"
        }});
        assert_eq!(check_error(404, &not_found), Ok(()));
        let rate_limited = json!({"error": {
            "code": 429,
            "message": "Rate Limit Exceeded",
            "errors": [{"message": "Rate Limit Exceeded", "domain": "usageLimits", "reason": "rateLimitExceeded"}],
            "status": "RESOURCE_EXHAUSTED",
            "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "RATE_LIMIT_EXCEEDED"}]
        }});
        assert_eq!(check_error(429, &rate_limited), Ok(()));

        assert!(error_of(check_error(409, &not_found)).contains("error.code: expected 409"));
        let mut mislabelled = not_found.clone();
        mislabelled["error"]["status"] = json!("RESOURCE_EXHAUSTED");
        assert!(check_error(404, &mislabelled).is_err());
        let mut extra = not_found.clone();
        extra["kind"] = json!("compute#error");
        assert!(check_error(404, &extra).is_err());
        let mut no_reason = not_found;
        no_reason["error"]["errors"][0]
            .as_object_mut()
            .expect("object")
            .remove("reason");
        assert!(error_of(check_error(404, &no_reason)).contains("error.errors[0].reason: missing"));
    }

    #[test]
    fn every_pattern_in_the_document_compiles() {
        let doc: Value = serde_json::from_str(DOCUMENT).expect("the document parses");
        let mut patterns = Vec::new();
        collect_patterns(&doc, &mut patterns);
        assert!(patterns.len() >= 8, "{patterns:?}");
        for pattern in &patterns {
            if let Err(e) = Pattern::compile(pattern) {
                panic!("{pattern}: {e}");
            }
        }
    }

    #[test]
    fn patterns_match_whole_values() {
        let name = Pattern::compile("[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?|[1-9][0-9]{0,19}")
            .expect("compiles");
        for ok in [
            "a",
            "c1-cp-0",
            "us-east1-b",
            "1234567890123456789",
            &format!("a{}", "b".repeat(62)),
        ] {
            assert!(name.is_match(ok), "{ok}");
        }
        for bad in [
            "",
            "A",
            "c1-",
            "-c1",
            "c1_cp",
            "0123",
            &format!("a{}", "b".repeat(63)),
        ] {
            assert!(!name.is_match(bad), "{bad}");
        }
        let project = Pattern::compile(
            "(?:(?:[-a-z0-9]{1,63}\\.)*(?:[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?):)?(?:[0-9]{1,19}|(?:[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?))",
        )
        .expect("compiles");
        for ok in ["my-project", "google.com:my-project", "123456789012"] {
            assert!(project.is_match(ok), "{ok}");
        }
        for bad in ["My-Project", "my_project", "a:b:c"] {
            assert!(!project.is_match(bad), "{bad}");
        }
        let cidr = Pattern::compile("[0-9]{1,3}(?:\\.[0-9]{1,3}){3}/[0-9]{1,2}").expect("compiles");
        assert!(cidr.is_match("10.0.0.0/16"));
        assert!(!cidr.is_match("10.0.0/16"));
        let key = Pattern::compile("[a-zA-Z0-9-_]{1,128}").expect("compiles");
        assert!(key.is_match("user-data_2"));
        assert!(!key.is_match("user.data"));
        let token = Pattern::compile("\\S{1,66}").expect("compiles");
        assert!(token.is_match("abc"));
        assert!(!token.is_match("a b"));
    }

    #[test]
    fn unsupported_regex_constructs_are_compile_errors() {
        for pattern in [
            "a+", "^a", "a$", ".", "[^a]", "(a)", "\\d", "a{2,}", "a**", "[a",
        ] {
            assert!(Pattern::compile(pattern).is_err(), "{pattern}");
        }
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(
            percent_decode("a%3D%22b%22+c", true),
            Ok("a=\"b\" c".to_string())
        );
        assert_eq!(percent_decode("a+b", false), Ok("a+b".to_string()));
        assert!(percent_decode("%4", true).is_err());
        assert!(percent_decode("%ff", true).is_err());
    }
}
