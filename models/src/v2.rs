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
    pub data: Option<Value>,
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

impl Serialize for ResponseData {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            ResponseData::Json(v) => v.serialize(s),
            ResponseData::Typed(data) => {
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
        }
    }
}

impl InferenceRequest {
    /// Parses a request body, turning serde's complaint into a [`ModelError::BadRequest`].
    pub fn from_json(bytes: &[u8]) -> Result<InferenceRequest> {
        serde_json::from_slice(bytes).map_err(|e| ModelError::BadRequest(e.to_string()))
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
            data: Some(tensor_data_to_json(t.data())),
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
        let Some(data) = &self.data else {
            return Err(ModelError::BadData {
                input: self.name.clone(),
                reason: "the input has no `data` (and no binary data was attached)".to_owned(),
            });
        };
        let mut flat = Vec::with_capacity(expected.min(max_elements));
        flatten(&self.name, data, expected, &mut flat)?;
        if flat.len() != expected {
            return Err(ModelError::DataLength {
                input: self.name.clone(),
                got: flat.len(),
                expected,
                shape: format_shape(&shape),
            });
        }
        let data = json_to_tensor_data(&self.name, datatype, &flat)?;
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
/// request with absurdly long data costs no more than reading it.
fn flatten<'a>(name: &str, v: &'a Value, limit: usize, out: &mut Vec<&'a Value>) -> Result<()> {
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
        leaf => {
            out.push(leaf);
            Ok(())
        }
    }
}

fn json_to_tensor_data(name: &str, datatype: Datatype, flat: &[&Value]) -> Result<TensorData> {
    let bad = |i: usize, v: &Value, what: &str| ModelError::BadData {
        input: name.to_owned(),
        reason: format!("value {v} at index {i} is not {what}"),
    };
    fn ints<T: TryFrom<i64>>(
        flat: &[&Value],
        bad: &impl Fn(usize, &Value, &str) -> ModelError,
        what: &str,
    ) -> Result<Vec<T>> {
        flat.iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_i64()
                    .and_then(|x| T::try_from(x).ok())
                    .ok_or_else(|| bad(i, v, what))
            })
            .collect()
    }
    let floats = |what: &str, max: f64| -> Result<Vec<f64>> {
        flat.iter()
            .enumerate()
            .map(|(i, v)| match v.as_f64() {
                Some(x) if x.abs() <= max => Ok(x),
                _ => Err(bad(i, v, what)),
            })
            .collect()
    };
    Ok(match datatype {
        Datatype::Bool => TensorData::Bool(
            flat.iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_bool()
                        .ok_or_else(|| bad(i, v, "a boolean (true or false)"))
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
            assert_eq!(again.data.as_ref(), v.get("data"), "{dt}");
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
                .contains("value \"x\" at index 0 is not a number"),
            "{err}"
        );
        let err = input(json!({"name":"a","shape":[1],"datatype":"FP16","data":[1e6]}))
            .decode(DEFAULT_MAX_ELEMENTS)
            .unwrap_err();
        assert!(err.to_string().contains("within the FP16 range"), "{err}");
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
