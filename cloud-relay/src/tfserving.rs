//! TensorFlow Serving's REST API on the relay, so clients written for TF Serving call it
//! unchanged: `GET /v1/models/{name}[/versions/{v}]` (status), `.../metadata` (the signature),
//! and `POST /v1/models/{name}[/versions/{v}]:predict` with `instances` (row format) or
//! `inputs` (columnar), answered with `predictions` or `outputs`, and TF Serving's error body
//! (`{"error": "..."}`).
//!
//! A predict request is translated into an Open Inference Protocol request and served by the
//! same path as `/v2/.../infer` (authentication, limits, deadlines, batching); the translation
//! both ways is pure and tested here. Models the relay forwards to an upstream V2 server are
//! served on `/v2` only.

use models::manifest::ModelSpec;
use serde_json::{Map, Value, json};

/// Deepest nesting a tensor may have in a request.
const MAX_RANK: usize = 16;

/// Which of TF Serving's two request formats a request used: its answer uses the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `{"instances": [...]}`, answered with `{"predictions": [...]}`.
    Row,
    /// `{"inputs": ...}`, answered with `{"outputs": ...}`.
    Columnar,
}

/// TF Serving's data type names, from the V2 ones.
pub fn tf_dtype(v2: &str) -> &'static str {
    match v2 {
        "FP32" => "DT_FLOAT",
        "FP16" => "DT_HALF",
        "FP64" => "DT_DOUBLE",
        "INT8" => "DT_INT8",
        "UINT8" => "DT_UINT8",
        "INT32" => "DT_INT32",
        "INT64" => "DT_INT64",
        "BOOL" => "DT_BOOL",
        _ => "DT_INVALID",
    }
}

/// The model status body of `GET /v1/models/{name}`.
pub fn status(version: &str) -> Value {
    json!({"model_version_status": [{
        "version": version,
        "state": "AVAILABLE",
        "status": {"error_code": "OK", "error_message": ""},
    }]})
}

/// The metadata body of `GET /v1/models/{name}/metadata`: one `serving_default` signature.
pub fn metadata(spec: &ModelSpec) -> Value {
    let tensors = |ts: &[models::manifest::TensorSpec]| -> Map<String, Value> {
        ts.iter()
            .map(|t| {
                let dims: Vec<Value> = t
                    .shape
                    .iter()
                    .map(|d| json!({"size": d.to_string(), "name": ""}))
                    .collect();
                (
                    t.name.clone(),
                    json!({
                        "dtype": tf_dtype(t.datatype.as_str()),
                        "tensor_shape": {"dim": dims, "unknown_rank": false},
                        "name": t.name,
                    }),
                )
            })
            .collect()
    };
    json!({
        "model_spec": {"name": spec.name, "signature_name": "", "version": spec.version},
        "metadata": {"signature_def": {"signature_def": {"serving_default": {
            "inputs": tensors(&spec.inputs),
            "outputs": tensors(&spec.outputs),
            "method_name": "tensorflow/serving/predict",
        }}}},
    })
}

/// A TF Serving predict body as an Open Inference Protocol request for `spec`'s model.
pub fn to_v2(
    body: &Value,
    spec: &ModelSpec,
    max_elements: usize,
) -> Result<(Value, Format), String> {
    let Some(obj) = body.as_object() else {
        return Err("the request body must be a JSON object with `instances` or `inputs`".into());
    };
    if let Some(k) = obj
        .keys()
        .find(|k| !matches!(k.as_str(), "instances" | "inputs" | "signature_name"))
    {
        return Err(format!(
            "unknown key `{k}`: a predict request has `instances` or `inputs` (and `signature_name`)"
        ));
    }
    let signature = obj.get("signature_name").and_then(Value::as_str);
    if signature.is_some_and(|s| !s.is_empty() && s != "serving_default") {
        return Err(format!(
            "model `{}` has one signature, `serving_default`",
            spec.name
        ));
    }
    let names: Vec<&str> = spec.inputs.iter().map(|t| t.name.as_str()).collect();
    let (format, columns): (Format, Vec<(String, Tensor)>) =
        match (obj.get("instances"), obj.get("inputs")) {
            (Some(_), Some(_)) => return Err("give `instances` or `inputs`, not both".into()),
            (None, None) => {
                return Err(
                    "a predict request needs `instances` (rows) or `inputs` (columns)".into(),
                );
            }
            (Some(instances), None) => (Format::Row, rows(instances, &names, max_elements)?),
            (None, Some(inputs)) => (Format::Columnar, columns(inputs, &names, max_elements)?),
        };
    let mut inputs = Vec::new();
    for t in &spec.inputs {
        let Some((_, tensor)) = columns.iter().find(|(n, _)| *n == t.name) else {
            return Err(format!(
                "input `{}` of model `{}` is missing",
                t.name, spec.name
            ));
        };
        inputs.push(json!({
            "name": t.name,
            "shape": tensor.shape,
            "datatype": t.datatype.as_str(),
            "data": tensor.data,
        }));
    }
    if let Some((n, _)) = columns.iter().find(|(n, _)| !names.contains(&n.as_str())) {
        return Err(format!(
            "model `{}` has no input named `{n}`; its inputs are: {}",
            spec.name,
            names.join(", ")
        ));
    }
    Ok((json!({ "inputs": inputs }), format))
}

/// A V2 response's outputs in TF Serving's format.
pub fn from_v2(response: &Value, format: Format) -> Result<Value, String> {
    let outputs = response
        .get("outputs")
        .and_then(Value::as_array)
        .ok_or("the model's answer has no outputs")?;
    let mut named = Vec::new();
    for o in outputs {
        let name = o.get("name").and_then(Value::as_str).unwrap_or_default();
        let shape: Vec<usize> = o
            .get("shape")
            .and_then(Value::as_array)
            .map(|s| {
                s.iter()
                    .filter_map(Value::as_u64)
                    .filter_map(|d| usize::try_from(d).ok())
                    .collect()
            })
            .unwrap_or_default();
        let data = o
            .get("data")
            .and_then(Value::as_array)
            .ok_or_else(|| format!("output `{name}` carries no JSON data"))?;
        named.push((name.to_owned(), shape, data.as_slice()));
    }
    Ok(match format {
        Format::Columnar => {
            let nested: Vec<(String, Value)> = named
                .iter()
                .map(|(n, shape, data)| (n.clone(), nest(data, shape)))
                .collect();
            match nested.as_slice() {
                [(_, one)] => json!({ "outputs": one }),
                _ => json!({ "outputs": Map::from_iter(nested) }),
            }
        }
        Format::Row => {
            let batch = named
                .first()
                .and_then(|(_, s, _)| s.first())
                .copied()
                .unwrap_or(0);
            let mut predictions = Vec::with_capacity(batch);
            for row in 0..batch {
                let mut cells = Vec::new();
                for (n, shape, data) in &named {
                    let per_row: usize = shape.iter().skip(1).product();
                    let slice = data
                        .get(row * per_row..(row + 1) * per_row)
                        .unwrap_or_default();
                    cells.push((n.clone(), nest(slice, shape.get(1..).unwrap_or_default())));
                }
                predictions.push(match cells.len() {
                    1 => cells.pop().map(|(_, v)| v).unwrap_or_default(),
                    _ => Value::Object(Map::from_iter(cells)),
                });
            }
            json!({ "predictions": predictions })
        }
    })
}

/// A tensor read from nested JSON arrays.
#[derive(Debug, Clone, PartialEq)]
struct Tensor {
    shape: Vec<usize>,
    data: Vec<Value>,
}

/// Row format: a list of instances, each the value of the one input, or an object naming each.
fn rows(
    instances: &Value,
    names: &[&str],
    max_elements: usize,
) -> Result<Vec<(String, Tensor)>, String> {
    let list = instances
        .as_array()
        .ok_or("`instances` must be a list, one item per example")?;
    if list.is_empty() {
        return Err("`instances` is empty".into());
    }
    let mut stacked: Vec<(String, Tensor)> = Vec::new();
    for (i, instance) in list.iter().enumerate() {
        let cells: Vec<(String, &Value)> = match (instance, names) {
            (Value::Object(m), _) => m.iter().map(|(k, v)| (k.clone(), v)).collect(),
            (v, [one]) => vec![((*one).to_owned(), v)],
            _ => {
                return Err(format!(
                    "instance {i} must be an object naming each input ({}): the model has several",
                    names.join(", ")
                ));
            }
        };
        for (name, value) in cells {
            let budget =
                max_elements.saturating_sub(stacked.iter().map(|(_, t)| t.data.len()).sum());
            let t = read(value, budget).map_err(|e| format!("instance {i}, `{name}`: {e}"))?;
            match stacked.iter_mut().find(|(n, _)| *n == name) {
                None if i == 0 => {
                    let mut shape = vec![1];
                    shape.extend(&t.shape);
                    stacked.push((
                        name,
                        Tensor {
                            shape,
                            data: t.data,
                        },
                    ));
                }
                None => {
                    return Err(format!(
                        "instance {i} names `{name}`, which instance 0 does not"
                    ));
                }
                Some((_, s)) if s.shape.get(1..) == Some(t.shape.as_slice()) => {
                    s.shape[0] += 1;
                    s.data.extend(t.data);
                }
                Some((_, s)) => {
                    return Err(format!(
                        "instance {i}, `{name}`: shape {:?} differs from instance 0's {:?}",
                        t.shape,
                        s.shape.get(1..).unwrap_or_default()
                    ));
                }
            }
        }
    }
    Ok(stacked)
}

/// Columnar format: the one input's value (batch axis included), or an object naming each.
fn columns(
    inputs: &Value,
    names: &[&str],
    max_elements: usize,
) -> Result<Vec<(String, Tensor)>, String> {
    let cells: Vec<(String, &Value)> = match (inputs, names) {
        (Value::Object(m), _) => m.iter().map(|(k, v)| (k.clone(), v)).collect(),
        (v, [one]) => vec![((*one).to_owned(), v)],
        _ => {
            return Err(format!(
                "`inputs` must be an object naming each input ({}): the model has several",
                names.join(", ")
            ));
        }
    };
    let mut out = Vec::new();
    let mut left = max_elements;
    for (name, value) in cells {
        let t = read(value, left).map_err(|e| format!("`{name}`: {e}"))?;
        left = left.saturating_sub(t.data.len());
        out.push((name, t));
    }
    Ok(out)
}

/// Reads nested arrays of scalars into a shape and flat data; refuses ragged arrays, more than
/// `max_elements` values and more than [`MAX_RANK`] levels.
fn read(value: &Value, max_elements: usize) -> Result<Tensor, String> {
    let mut shape = Vec::new();
    let mut probe = value;
    while let Value::Array(items) = probe {
        if shape.len() == MAX_RANK {
            return Err(format!("more than {MAX_RANK} levels of nesting"));
        }
        shape.push(items.len());
        match items.first() {
            Some(first) => probe = first,
            None => break,
        }
    }
    let count = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    match count {
        Some(n) if n <= max_elements => {}
        _ => {
            return Err(format!(
                "more than {max_elements} values (limits.max_elements)"
            ));
        }
    }
    let mut data = Vec::with_capacity(count.unwrap_or(0));
    collect(value, &shape, &mut data)?;
    Ok(Tensor { shape, data })
}

fn collect(value: &Value, shape: &[usize], out: &mut Vec<Value>) -> Result<(), String> {
    match (value, shape.split_first()) {
        (Value::Array(items), Some((&len, rest))) if items.len() == len => {
            items.iter().try_for_each(|v| collect(v, rest, out))
        }
        (Value::Array(_), _) => Err("the nested lists are ragged (not one shape)".into()),
        (Value::Number(_) | Value::Bool(_), None) => {
            out.push(value.clone());
            Ok(())
        }
        (Value::Number(_) | Value::Bool(_), Some(_)) => {
            Err("the nested lists are ragged (not one shape)".into())
        }
        _ => Err("values must be numbers or booleans".into()),
    }
}

/// Flat row-major data as nested arrays of `shape`.
fn nest(data: &[Value], shape: &[usize]) -> Value {
    match shape.split_first() {
        None => data.first().cloned().unwrap_or(Value::Null),
        Some((&len, rest)) => {
            let per: usize = rest.iter().product();
            Value::Array(
                (0..len)
                    .map(|i| nest(data.get(i * per..(i + 1) * per).unwrap_or_default(), rest))
                    .collect(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn spec(inputs: &[(&str, &[i64])]) -> ModelSpec {
        let mut text = String::from(
            "name = \"m\"\nversion = \"1\"\ntask = \"other\"\norigin = \"test\"\nlicence = \"MIT\"\nvariants = []\n",
        );
        for (n, s) in inputs {
            text.push_str(&format!(
                "[[inputs]]\nname = \"{n}\"\ndatatype = \"FP32\"\nshape = {s:?}\n"
            ));
        }
        text.push_str("[[outputs]]\nname = \"y\"\ndatatype = \"FP32\"\nshape = [-1, 2]\n");
        toml::from_str(&text).unwrap()
    }

    #[test]
    fn requests_in_both_formats_become_v2_requests() {
        let one = spec(&[("x", &[-1, 2])]);
        let two = spec(&[("a", &[-1, 1]), ("b", &[-1, 2])]);
        type Case<'a> = (&'a ModelSpec, Value, Result<(Value, Format), &'a str>);
        let cases: Vec<Case<'_>> = vec![
            (
                &one,
                json!({"instances": [[1.0, 2.0], [3.0, 4.0]]}),
                Ok((
                    json!({"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}]}),
                    Format::Row,
                )),
            ),
            (
                &one,
                json!({"instances": [{"x": [1, 2]}]}),
                Ok((
                    json!({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}),
                    Format::Row,
                )),
            ),
            (
                &one,
                json!({"inputs": [[1, 2], [3, 4]], "signature_name": "serving_default"}),
                Ok((
                    json!({"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]}]}),
                    Format::Columnar,
                )),
            ),
            (
                &two,
                json!({"inputs": {"b": [[1, 2]], "a": [[5]]}}),
                Ok((
                    json!({"inputs": [
                    {"name": "a", "shape": [1, 1], "datatype": "FP32", "data": [5]},
                    {"name": "b", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}),
                    Format::Columnar,
                )),
            ),
            (
                &one,
                json!({"instances": [[1, 2], [3]]}),
                Err("shape [1] differs"),
            ),
            (&one, json!({"instances": [[1, [2]]]}), Err("ragged")),
            (
                &one,
                json!({"instances": [["a", "b"]]}),
                Err("numbers or booleans"),
            ),
            (&one, json!({"instances": []}), Err("is empty")),
            (
                &one,
                json!({"instances": [[1, 2]], "inputs": [[1, 2]]}),
                Err("not both"),
            ),
            (&one, json!({}), Err("needs `instances`")),
            (&one, json!([1]), Err("JSON object")),
            (
                &one,
                json!({"instance": [1]}),
                Err("unknown key `instance`"),
            ),
            (
                &one,
                json!({"inputs": [[1, 2]], "signature_name": "other"}),
                Err("one signature"),
            ),
            (
                &two,
                json!({"instances": [[1]]}),
                Err("object naming each input"),
            ),
            (
                &two,
                json!({"inputs": {"a": [[1]]}}),
                Err("input `b` of model `m` is missing"),
            ),
            (
                &two,
                json!({"inputs": {"a": [[1]], "b": [[1, 2]], "c": [1]}}),
                Err("no input named `c`"),
            ),
            (
                &one,
                json!({"inputs": vec![vec![1.0; 2]; 600]}),
                Err("more than 1000 values"),
            ),
            (
                &one,
                json!({"inputs": [[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]}),
                Err("levels of nesting"),
            ),
        ];
        for (spec, body, want) in cases {
            let got = to_v2(&body, spec, 1000);
            match (got, want) {
                (Ok(g), Ok(w)) => assert_eq!(g, w, "{body}"),
                (Err(e), Err(w)) => assert!(e.contains(w), "{body}: `{e}` lacks `{w}`"),
                (g, w) => panic!("{body}: got {g:?}, wanted {w:?}"),
            }
        }
    }

    #[test]
    fn answers_come_back_in_the_requests_format() {
        let v2 = json!({"outputs": [{"name": "y", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]}]});
        assert_eq!(
            from_v2(&v2, Format::Row).unwrap(),
            json!({"predictions": [[1, 2], [3, 4]]})
        );
        assert_eq!(
            from_v2(&v2, Format::Columnar).unwrap(),
            json!({"outputs": [[1, 2], [3, 4]]})
        );
        let two = json!({"outputs": [
            {"name": "y", "shape": [2, 1], "datatype": "FP32", "data": [1, 2]},
            {"name": "z", "shape": [2], "datatype": "INT64", "data": [7, 8]}]});
        assert_eq!(
            from_v2(&two, Format::Row).unwrap(),
            json!({"predictions": [{"y": [1], "z": 7}, {"y": [2], "z": 8}]})
        );
        assert_eq!(
            from_v2(&two, Format::Columnar).unwrap(),
            json!({"outputs": {"y": [[1], [2]], "z": [7, 8]}})
        );
        assert!(from_v2(&json!({}), Format::Row).is_err());
    }
}
