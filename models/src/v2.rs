//! The Open Inference Protocol (KServe V2) JSON forms of requests, responses and tensors, and
//! their conversion to and from [`Tensor`]. Owns wire validation (datatype names, shapes, data
//! lengths, value ranges); knows nothing about models, which [`crate::engine`] checks against.

use serde::ser::SerializeSeq;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::error::{ModelError, Result};
use crate::tensor::{Datatype, Tensor, TensorData, element_count, format_shape};

/// Default cap on the elements of one input tensor (16 Mi: a 4096x4096 frame), so a request
/// cannot make the server allocate without bound.
pub const DEFAULT_MAX_ELEMENTS: usize = 16 * 1024 * 1024;

/// The binary tensor extension's header: the length of the JSON part of a body whose binary
/// tensors follow it.
pub const BINARY_HEADER: &str = "inference-header-content-length";

/// Inputs one request may carry data for, at `max_elements` each: with it, the bound on the
/// data values a parsed request may hold in all.
pub const MAX_INPUTS: usize = 8;

/// A V2 inference request body.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct InferenceRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Map<String, Value>>,
    pub inputs: Vec<RequestInput>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outputs: Option<Vec<RequestOutput>>,
}

/// One input tensor of a request. `data` is absent only when the binary extension carries it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RequestInput {
    pub name: String,
    pub shape: Vec<i64>,
    pub datatype: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<InputData>,
}

/// An input's `data`: typed when we produce it, and when parsed, its leaves flattened in row
/// order as they are read. A parsed request never holds a JSON tree: `[[[0.5]]]` costs one
/// 16-byte leaf, not three nested arrays of 32-byte values, and the leaves of one request are
/// bounded while parsing ([`InferenceRequest::from_json_limited`]).
#[derive(Debug, Clone, PartialEq)]
pub enum InputData {
    Typed(TensorData),
    Leaves(Vec<Leaf>),
}

/// One scalar of parsed `data`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Leaf {
    Bool(bool),
    Int(i64),
    /// Above `i64::MAX`.
    UInt(u64),
    Float(f64),
    /// A string or `null`: never valid tensor data, kept to name it in the error.
    Text,
    Null,
}

impl Leaf {
    fn as_i64(self) -> Option<i64> {
        match self {
            Leaf::Int(i) => Some(i),
            _ => None,
        }
    }

    fn as_f64(self) -> Option<f64> {
        match self {
            Leaf::Int(i) => Some(i as f64),
            Leaf::UInt(u) => Some(u as f64),
            Leaf::Float(f) => Some(f),
            _ => None,
        }
    }
}

impl std::fmt::Display for Leaf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Leaf::Bool(b) => write!(f, "{b}"),
            Leaf::Int(i) => write!(f, "{i}"),
            Leaf::UInt(u) => write!(f, "{u}"),
            Leaf::Float(x) => write!(f, "{x}"),
            Leaf::Text => f.write_str("(a string)"),
            Leaf::Null => f.write_str("null"),
        }
    }
}

thread_local! {
    /// Leaves the request being parsed on this thread may still hold (`usize::MAX`: no bound).
    static LEAF_BUDGET: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) };
}

impl Serialize for InputData {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            InputData::Typed(data) => serialize_typed(data, s),
            InputData::Leaves(leaves) => {
                let mut seq = s.serialize_seq(Some(leaves.len()))?;
                for leaf in leaves {
                    match *leaf {
                        Leaf::Bool(b) => seq.serialize_element(&b)?,
                        Leaf::Int(i) => seq.serialize_element(&i)?,
                        Leaf::UInt(u) => seq.serialize_element(&u)?,
                        Leaf::Float(x) => seq.serialize_element(&x)?,
                        Leaf::Text => seq.serialize_element("")?,
                        Leaf::Null => seq.serialize_element(&())?,
                    }
                }
                seq.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for InputData {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Flat<'a>(&'a mut Vec<Leaf>);

        impl Flat<'_> {
            fn push<E: serde::de::Error>(&mut self, leaf: Leaf) -> std::result::Result<(), E> {
                let left = LEAF_BUDGET.with(std::cell::Cell::get);
                if left == 0 {
                    return Err(E::custom(
                        "the request holds more data values than its inputs may have (limits.max_elements)",
                    ));
                }
                if left != usize::MAX {
                    LEAF_BUDGET.with(|b| b.set(left - 1));
                }
                self.0.push(leaf);
                Ok(())
            }
        }

        impl<'de> serde::de::DeserializeSeed<'de> for Flat<'_> {
            type Value = ();
            fn deserialize<D: serde::Deserializer<'de>>(
                self,
                d: D,
            ) -> std::result::Result<(), D::Error> {
                d.deserialize_any(self)
            }
        }

        impl<'de> serde::de::Visitor<'de> for Flat<'_> {
            type Value = ();
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an array of values (possibly nested)")
            }
            fn visit_bool<E: serde::de::Error>(mut self, v: bool) -> std::result::Result<(), E> {
                self.push(Leaf::Bool(v))
            }
            fn visit_i64<E: serde::de::Error>(mut self, v: i64) -> std::result::Result<(), E> {
                self.push(Leaf::Int(v))
            }
            fn visit_u64<E: serde::de::Error>(mut self, v: u64) -> std::result::Result<(), E> {
                self.push(i64::try_from(v).map_or(Leaf::UInt(v), Leaf::Int))
            }
            fn visit_f64<E: serde::de::Error>(mut self, v: f64) -> std::result::Result<(), E> {
                self.push(Leaf::Float(v))
            }
            fn visit_str<E: serde::de::Error>(mut self, _: &str) -> std::result::Result<(), E> {
                self.push(Leaf::Text)
            }
            fn visit_unit<E: serde::de::Error>(mut self) -> std::result::Result<(), E> {
                self.push(Leaf::Null)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<(), A::Error> {
                while seq.next_element_seed(Flat(&mut *self.0))?.is_some() {}
                Ok(())
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                _: A,
            ) -> std::result::Result<(), A::Error> {
                Err(serde::de::Error::custom(
                    "`data` must be an array of values, not an object",
                ))
            }
        }

        let mut leaves = Vec::new();
        serde::de::DeserializeSeed::deserialize(Flat(&mut leaves), d)?;
        Ok(InputData::Leaves(leaves))
    }
}

/// An output the client asks for by name.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RequestOutput {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Map<String, Value>>,
}

/// A V2 inference response body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InferenceResponse {
    pub model_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Map<String, Value>>,
    pub outputs: Vec<ResponseOutput>,
}

/// One output tensor of a response.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ResponseOutput {
    pub name: String,
    pub shape: Vec<usize>,
    pub datatype: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Map<String, Value>>,
    /// Absent (`null` here) when the output travels as binary data after the JSON.
    #[serde(default = "ResponseData::absent")]
    pub data: ResponseData,
}

/// Output data: typed when we produce it (serialised straight from the buffer, without building
/// a JSON tree), generic when we parse someone else's response.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum ResponseData {
    Json(Value),
    #[serde(skip)]
    Typed(TensorData),
}

impl ResponseData {
    fn absent() -> ResponseData {
        ResponseData::Json(Value::Null)
    }
}

/// A response body in either of the protocol's forms: plain JSON, or (with `json_len`, the
/// binary extension's header) that many bytes of JSON followed by the binary outputs in order,
/// each `binary_data_size` bytes long. Binary outputs come back typed.
pub fn decode_response(body: &[u8], json_len: Option<usize>) -> Result<InferenceResponse> {
    let bad = |m: String| ModelError::BadRequest(format!("the response is not a V2 response: {m}"));
    let Some(json_len) = json_len else {
        return serde_json::from_slice(body).map_err(|e| bad(e.to_string()));
    };
    let (head, mut rest) = body.split_at_checked(json_len).ok_or_else(|| {
        bad(format!(
            "its JSON header is {json_len} bytes but the body has {}",
            body.len()
        ))
    })?;
    let mut response: InferenceResponse =
        serde_json::from_slice(head).map_err(|e| bad(e.to_string()))?;
    for out in &mut response.outputs {
        let Some(size) = out
            .parameters
            .as_ref()
            .and_then(|p| p.get("binary_data_size"))
            .and_then(Value::as_u64)
        else {
            continue;
        };
        let size = usize::try_from(size).unwrap_or(usize::MAX);
        let (bytes, tail) = rest.split_at_checked(size).ok_or_else(|| {
            bad(format!(
                "output `{}` has {size} bytes of binary data but {} remain",
                out.name,
                rest.len()
            ))
        })?;
        rest = tail;
        let datatype = Datatype::parse(&out.datatype)?;
        let data = TensorData::from_le_bytes(datatype, bytes)
            .map_err(|e| bad(format!("output `{}`: {e}", out.name)))?;
        out.data = ResponseData::Typed(data);
    }
    if !rest.is_empty() {
        return Err(bad(format!(
            "{} bytes of binary data belong to no output",
            rest.len()
        )));
    }
    Ok(response)
}

impl Serialize for ResponseData {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            ResponseData::Json(v) => v.serialize(s),
            ResponseData::Typed(data) => serialize_typed(data, s),
        }
    }
}

/// Tensor data as a flat JSON array, straight from the buffer.
fn serialize_typed<S: Serializer>(data: &TensorData, s: S) -> std::result::Result<S::Ok, S::Error> {
    let mut seq = s.serialize_seq(Some(data.len()))?;
    match data {
        TensorData::Bool(v) => v.iter().try_for_each(|x| seq.serialize_element(x))?,
        TensorData::U8(v) => v.iter().try_for_each(|x| seq.serialize_element(x))?,
        TensorData::I8(v) => v.iter().try_for_each(|x| seq.serialize_element(x))?,
        TensorData::I32(v) => v.iter().try_for_each(|x| seq.serialize_element(x))?,
        TensorData::I64(v) => v.iter().try_for_each(|x| seq.serialize_element(x))?,
        TensorData::F16(v) => v
            .iter()
            .try_for_each(|x| seq.serialize_element(&f32::from(*x)))?,
        TensorData::F32(v) => v.iter().try_for_each(|x| seq.serialize_element(x))?,
    }
    seq.end()
}

impl InferenceRequest {
    /// Parses a request body, turning serde's complaint into a [`ModelError::BadRequest`].
    pub fn from_json(bytes: &[u8]) -> Result<InferenceRequest> {
        serde_json::from_slice(bytes).map_err(|e| ModelError::BadRequest(e.to_string()))
    }

    /// [`InferenceRequest::from_json`], refusing while parsing a request whose inputs carry
    /// more than `max_leaves` data values in all: memory stays proportional to what the
    /// request may hold, whatever its body says.
    pub fn from_json_limited(bytes: &[u8], max_leaves: usize) -> Result<InferenceRequest> {
        struct Reset(usize);
        impl Drop for Reset {
            fn drop(&mut self) {
                LEAF_BUDGET.with(|b| b.set(self.0));
            }
        }
        let _reset = Reset(LEAF_BUDGET.with(|b| b.replace(max_leaves.min(usize::MAX - 1))));
        Self::from_json(bytes)
    }

    /// Forgets every input's parsed `data` (once it has been decoded into tensors).
    pub fn drop_data(&mut self) {
        for input in &mut self.inputs {
            input.data = None;
        }
    }

    /// Decodes every input from its JSON `data`.
    pub fn decode_inputs(&self, max_elements: usize) -> Result<Vec<Tensor>> {
        self.inputs
            .iter()
            .map(|input| input.decode(max_elements))
            .collect()
    }

    /// A request carrying these tensors as JSON.
    pub fn from_tensors(id: Option<String>, tensors: &[Tensor]) -> InferenceRequest {
        InferenceRequest {
            id,
            parameters: None,
            inputs: tensors.iter().map(RequestInput::from_tensor).collect(),
            outputs: None,
        }
    }
}

impl RequestInput {
    /// A JSON input holding this tensor.
    pub fn from_tensor(t: &Tensor) -> RequestInput {
        RequestInput {
            name: t.name().to_owned(),
            shape: t
                .shape()
                .iter()
                .map(|&d| i64::try_from(d).unwrap_or(i64::MAX))
                .collect(),
            datatype: t.datatype().as_str().to_owned(),
            parameters: None,
            data: Some(InputData::Typed(t.data().clone())),
        }
    }

    /// The declared shape as sizes, refusing negative dimensions and oversized tensors.
    pub fn checked_shape(&self, max_elements: usize) -> Result<(Vec<usize>, usize)> {
        let mut shape = Vec::with_capacity(self.shape.len());
        for &d in &self.shape {
            let d = usize::try_from(d).map_err(|_| ModelError::AbsurdShape {
                input: self.name.clone(),
                shape: format!("{:?}", self.shape).replace(' ', ""),
                reason: format!("dimension {d} is negative"),
            })?;
            shape.push(d);
        }
        let count = element_count(&self.name, &shape)?;
        if count > max_elements {
            return Err(ModelError::AbsurdShape {
                input: self.name.clone(),
                shape: format_shape(&shape),
                reason: format!("{count} elements exceed the limit of {max_elements}"),
            });
        }
        Ok((shape, count))
    }

    /// Decodes the JSON `data` into a typed tensor, checking datatype, shape and length.
    pub fn decode(&self, max_elements: usize) -> Result<Tensor> {
        let datatype = Datatype::parse(&self.datatype)?;
        let (shape, expected) = self.checked_shape(max_elements)?;
        let length_error = |got: usize| ModelError::DataLength {
            input: self.name.clone(),
            got,
            expected,
            shape: format_shape(&shape),
        };
        let data = match &self.data {
            None => {
                return Err(ModelError::BadData {
                    input: self.name.clone(),
                    reason: "the input has no `data` (and no binary data was attached)".to_owned(),
                });
            }
            Some(InputData::Typed(data)) if data.len() != expected => {
                return Err(length_error(data.len()));
            }
            Some(InputData::Typed(data)) => {
                if data.datatype() != datatype {
                    return Err(ModelError::BadData {
                        input: self.name.clone(),
                        reason: format!(
                            "the data is {} but the input says {}",
                            data.datatype().as_str(),
                            datatype.as_str()
                        ),
                    });
                }
                data.clone()
            }
            Some(InputData::Leaves(leaves)) if leaves.len() != expected => {
                return Err(length_error(leaves.len()));
            }
            Some(InputData::Leaves(leaves)) => json_to_tensor_data(&self.name, datatype, leaves)?,
        };
        Tensor::new(self.name.clone(), shape, data)
    }
}

impl ResponseOutput {
    /// A JSON output holding this tensor.
    pub fn from_tensor(t: Tensor) -> ResponseOutput {
        ResponseOutput {
            name: t.name().to_owned(),
            shape: t.shape().to_vec(),
            datatype: t.datatype().as_str().to_owned(),
            parameters: None,
            data: ResponseData::Typed(t.into_data()),
        }
    }

    /// Decodes the output back to a tensor (for clients and tests).
    pub fn to_tensor(&self) -> Result<Tensor> {
        let datatype = Datatype::parse(&self.datatype)?;
        match &self.data {
            ResponseData::Typed(data) => {
                Tensor::new(self.name.clone(), self.shape.clone(), data.clone())
            }
            ResponseData::Json(v) => {
                let expected = element_count(&self.name, &self.shape)?;
                let mut flat = Vec::with_capacity(expected);
                flatten(&self.name, v, expected, &mut flat)?;
                let data = json_to_tensor_data(&self.name, datatype, &flat)?;
                Tensor::new(self.name.clone(), self.shape.clone(), data)
            }
        }
    }
}

/// Collects the leaves of (possibly nested) arrays, stopping once `limit` is passed so a
/// response with absurdly long data costs no more than reading it.
fn flatten(name: &str, v: &Value, limit: usize, out: &mut Vec<Leaf>) -> Result<()> {
    match v {
        Value::Array(items) => {
            for item in items {
                flatten(name, item, limit, out)?;
                if out.len() > limit {
                    return Ok(());
                }
            }
            Ok(())
        }
        Value::Object(_) => Err(ModelError::BadData {
            input: name.to_owned(),
            reason: "`data` must be an array of values, not an object".to_owned(),
        }),
        Value::Bool(b) => {
            out.push(Leaf::Bool(*b));
            Ok(())
        }
        Value::Number(n) => {
            out.push(match (n.as_i64(), n.as_u64(), n.as_f64()) {
                (Some(i), _, _) => Leaf::Int(i),
                (None, Some(u), _) => Leaf::UInt(u),
                (None, None, Some(f)) => Leaf::Float(f),
                (None, None, None) => Leaf::Null,
            });
            Ok(())
        }
        Value::String(_) => {
            out.push(Leaf::Text);
            Ok(())
        }
        Value::Null => {
            out.push(Leaf::Null);
            Ok(())
        }
    }
}

fn json_to_tensor_data(name: &str, datatype: Datatype, flat: &[Leaf]) -> Result<TensorData> {
    let bad = |i: usize, v: Leaf, what: &str| ModelError::BadData {
        input: name.to_owned(),
        reason: format!("value {v} at index {i} is not {what}"),
    };
    fn ints<T: TryFrom<i64>>(
        flat: &[Leaf],
        bad: &impl Fn(usize, Leaf, &str) -> ModelError,
        what: &str,
    ) -> Result<Vec<T>> {
        flat.iter()
            .enumerate()
            .map(|(i, &v)| {
                v.as_i64()
                    .and_then(|x| T::try_from(x).ok())
                    .ok_or_else(|| bad(i, v, what))
            })
            .collect()
    }
    let floats = |what: &str, max: f64| -> Result<Vec<f64>> {
        flat.iter()
            .enumerate()
            .map(|(i, &v)| match v.as_f64() {
                Some(x) if x.abs() <= max => Ok(x),
                _ => Err(bad(i, v, what)),
            })
            .collect()
    };
    Ok(match datatype {
        Datatype::Bool => TensorData::Bool(
            flat.iter()
                .enumerate()
                .map(|(i, &v)| match v {
                    Leaf::Bool(b) => Ok(b),
                    _ => Err(bad(i, v, "a boolean (true or false)")),
                })
                .collect::<Result<_>>()?,
        ),
        Datatype::U8 => TensorData::U8(ints(flat, &bad, "an integer in 0..=255 (UINT8)")?),
        Datatype::I8 => TensorData::I8(ints(flat, &bad, "an integer in -128..=127 (INT8)")?),
        Datatype::I32 => TensorData::I32(ints(flat, &bad, "a 32-bit integer (INT32)")?),
        Datatype::I64 => TensorData::I64(ints(flat, &bad, "a 64-bit integer (INT64)")?),
        #[allow(clippy::cast_possible_truncation)]
        Datatype::F32 => TensorData::F32(
            floats("a number within the FP32 range", f64::from(f32::MAX))?
                .into_iter()
                .map(|x| x as f32)
                .collect(),
        ),
        Datatype::F16 => TensorData::F16(
            floats("a number within the FP16 range", 65504.0)?
                .into_iter()
                .map(half::f16::from_f64)
                .collect(),
        ),
    })
}

/// Tensor data as a flat JSON array.
pub fn tensor_data_to_json(data: &TensorData) -> Value {
    match data {
        TensorData::Bool(v) => Value::from(v.clone()),
        TensorData::U8(v) => Value::from(v.clone()),
        TensorData::I8(v) => Value::from(v.iter().map(|&x| i64::from(x)).collect::<Vec<_>>()),
        TensorData::I32(v) => Value::from(v.clone()),
        TensorData::I64(v) => Value::from(v.clone()),
        TensorData::F16(v) => Value::from(v.iter().map(|&x| f32::from(x)).collect::<Vec<_>>()),
        TensorData::F32(v) => Value::from(v.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn input(v: Value) -> RequestInput {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn decodes_every_datatype() {
        let cases = [
            (
                json!({"name":"a","shape":[2],"datatype":"BOOL","data":[true,false]}),
                Datatype::Bool,
            ),
            (
                json!({"name":"a","shape":[2],"datatype":"UINT8","data":[0,255]}),
                Datatype::U8,
            ),
            (
                json!({"name":"a","shape":[2],"datatype":"INT8","data":[-128,127]}),
                Datatype::I8,
            ),
            (
                json!({"name":"a","shape":[2],"datatype":"INT32","data":[-5,7]}),
                Datatype::I32,
            ),
            (
                json!({"name":"a","shape":[2],"datatype":"INT64","data":[-5,9007199254740993_i64]}),
                Datatype::I64,
            ),
            (
                json!({"name":"a","shape":[2],"datatype":"FP16","data":[0.5,-2.5]}),
                Datatype::F16,
            ),
            (
                json!({"name":"a","shape":[2],"datatype":"FP32","data":[0.5,-2.5]}),
                Datatype::F32,
            ),
        ];
        for (v, dt) in cases {
            let t = input(v.clone()).decode(DEFAULT_MAX_ELEMENTS).unwrap();
            assert_eq!(t.datatype(), dt);
            assert_eq!(t.shape(), &[2]);
            // And back to JSON, unchanged.
            let again = RequestInput::from_tensor(&t);
            assert_eq!(
                serde_json::to_value(&again.data).unwrap(),
                v["data"],
                "{dt}"
            );
        }
    }

    #[test]
    fn nested_data_is_row_major() {
        let t = input(json!({"name":"a","shape":[2,2],"datatype":"FP32","data":[[1,2],[3,4]]}))
            .decode(DEFAULT_MAX_ELEMENTS)
            .unwrap();
        assert_eq!(t.as_f32().unwrap(), &[1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn out_of_range_values_are_named() {
        let err = input(json!({"name":"a","shape":[3],"datatype":"UINT8","data":[1,2,300]}))
            .decode(DEFAULT_MAX_ELEMENTS)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "input `a`: value 300 at index 2 is not an integer in 0..=255 (UINT8)"
        );
        let err = input(json!({"name":"a","shape":[1],"datatype":"INT32","data":[1.5]}))
            .decode(DEFAULT_MAX_ELEMENTS)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("value 1.5 at index 0 is not a 32-bit integer"),
            "{err}"
        );
        let err = input(json!({"name":"a","shape":[1],"datatype":"FP32","data":["x"]}))
            .decode(DEFAULT_MAX_ELEMENTS)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("value (a string) at index 0 is not a number"),
            "{err}"
        );
        let err = input(json!({"name":"a","shape":[1],"datatype":"FP16","data":[1e6]}))
            .decode(DEFAULT_MAX_ELEMENTS)
            .unwrap_err();
        assert!(err.to_string().contains("within the FP16 range"), "{err}");
    }

    #[test]
    fn data_is_flattened_while_parsing_and_bounded() {
        let body = br#"{"inputs":[{"name":"a","shape":[2,1,1],"datatype":"FP32","data":[[[0.5]],[[1.5]]]}]}"#;
        let r = InferenceRequest::from_json(body).unwrap();
        assert_eq!(
            r.inputs[0].data,
            Some(InputData::Leaves(vec![Leaf::Float(0.5), Leaf::Float(1.5)]))
        );
        assert_eq!(
            r.decode_inputs(DEFAULT_MAX_ELEMENTS).unwrap()[0]
                .as_f32()
                .unwrap(),
            &[0.5, 1.5]
        );
        // Two leaves fit a budget of two, not of one; the budget does not outlive the call.
        assert!(InferenceRequest::from_json_limited(body, 2).is_ok());
        let err = InferenceRequest::from_json_limited(body, 1).unwrap_err();
        assert!(err.to_string().contains("limits.max_elements"), "{err}");
        assert!(InferenceRequest::from_json(body).is_ok());
        // An object anywhere in `data` is refused as it is read.
        let err = InferenceRequest::from_json(
            br#"{"inputs":[{"name":"a","shape":[1],"datatype":"FP32","data":[[{"x":1}]]}]}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("not an object"), "{err}");
    }

    #[test]
    fn length_must_match_shape() {
        let err = input(json!({"name":"a","shape":[1,3],"datatype":"FP32","data":[1,2]}))
            .decode(DEFAULT_MAX_ELEMENTS)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "input `a` has 2 values in `data` but its shape [1,3] needs 3"
        );
        assert_eq!(err.code(), crate::ErrorCode::BadRequest);
    }

    #[test]
    fn absurd_shapes_are_refused_before_reading_data() {
        let err = input(json!({"name":"a","shape":[-1,3],"datatype":"FP32","data":[]}))
            .decode(DEFAULT_MAX_ELEMENTS)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "input `a` has an unusable shape [-1,3]: dimension -1 is negative"
        );
        let err = input(json!({"name":"a","shape":[100000,100000],"datatype":"FP32","data":[]}))
            .decode(DEFAULT_MAX_ELEMENTS)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("10000000000 elements exceed the limit of 16777216"),
            "{err}"
        );
    }

    #[test]
    fn unknown_datatype_and_missing_data() {
        let err = input(json!({"name":"a","shape":[1],"datatype":"FP64","data":[1]}))
            .decode(DEFAULT_MAX_ELEMENTS)
            .unwrap_err();
        assert!(matches!(err, ModelError::UnsupportedDatatype(ref d) if d == "FP64"));
        let err = input(json!({"name":"a","shape":[1],"datatype":"FP32"}))
            .decode(DEFAULT_MAX_ELEMENTS)
            .unwrap_err();
        assert!(err.to_string().contains("has no `data`"), "{err}");
    }

    #[test]
    fn malformed_request_json_is_a_bad_request() {
        let err = InferenceRequest::from_json(b"{\"inputs\": [").unwrap_err();
        assert_eq!(err.code(), crate::ErrorCode::BadRequest);
        assert!(
            err.to_string()
                .starts_with("the request is not a valid inference request")
        );
        let err = InferenceRequest::from_json(
            br#"{"inputs":[{"name":"a","shape":"x","datatype":"FP32","data":[]}]}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("invalid type: string"), "{err}");
    }

    #[test]
    fn binary_responses_decode_and_lies_about_sizes_are_refused() {
        let head = br#"{"model_name":"m","outputs":[{"name":"p","shape":[2],"datatype":"FP32","parameters":{"binary_data_size":8}}]}"#;
        let mut body = head.to_vec();
        body.extend_from_slice(&0.25f32.to_le_bytes());
        body.extend_from_slice(&0.75f32.to_le_bytes());
        let r = decode_response(&body, Some(head.len())).unwrap();
        assert_eq!(
            r.outputs[0].to_tensor().unwrap().as_f32().unwrap(),
            &[0.25, 0.75]
        );
        for (cut, len) in [(4, head.len()), (0, head.len() + 100), (0, head.len() - 1)] {
            let b = &body[..body.len() - cut];
            assert!(
                decode_response(b, Some(len)).is_err(),
                "cut {cut}, len {len}"
            );
        }
        let mut extra = body.clone();
        extra.push(0);
        assert!(decode_response(&extra, Some(head.len())).is_err());
        // Plain JSON as before.
        let plain = br#"{"model_name":"m","outputs":[{"name":"p","shape":[1],"datatype":"FP32","data":[0.5]}]}"#;
        assert_eq!(
            decode_response(plain, None).unwrap().outputs[0]
                .to_tensor()
                .unwrap()
                .as_f32()
                .unwrap(),
            &[0.5]
        );
    }

    #[test]
    fn response_serialises_typed_data_flat() {
        let t = Tensor::new(
            "p",
            vec![1, 2],
            TensorData::F16(vec![half::f16::from_f32(0.5); 2]),
        )
        .unwrap();
        let out = ResponseOutput::from_tensor(t);
        let v = serde_json::to_value(&out).unwrap();
        assert_eq!(
            v,
            json!({"name":"p","shape":[1,2],"datatype":"FP16","data":[0.5,0.5]})
        );
        let parsed: ResponseOutput = serde_json::from_value(v).unwrap();
        assert_eq!(
            parsed.to_tensor().unwrap().data().to_f64_vec(),
            vec![0.5, 0.5]
        );
    }
}
