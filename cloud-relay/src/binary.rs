//! The Open Inference Protocol's binary tensor data extension (as Triton implements it): a JSON
//! header of `Inference-Header-Content-Length` bytes, then the raw tensors back to back, each
//! sized by its `parameters.binary_data_size`. Pure functions over bytes.

use models::v2::{InferenceRequest, InferenceResponse, ResponseData};
use models::{Datatype, ModelError, Tensor, TensorData};
use serde_json::{Value, json};

/// The HTTP header naming the JSON part's length.
pub const HEADER: &str = models::v2::BINARY_HEADER;

/// Parses a request body: all JSON, or a JSON header of `json_len` bytes followed by binary
/// tensors. Returns the request and its inputs decoded (in request order).
pub fn parse_request(
    body: &[u8],
    json_len: Option<usize>,
    max_elements: usize,
) -> Result<(InferenceRequest, Vec<Tensor>), ModelError> {
    let max_leaves = max_elements.saturating_mul(models::v2::MAX_INPUTS);
    let Some(json_len) = json_len else {
        let mut request = InferenceRequest::from_json_limited(body, max_leaves)?;
        let inputs = request.decode_inputs(max_elements)?;
        // The parsed values are in the tensors now: free them before the request waits.
        request.drop_data();
        return Ok((request, inputs));
    };
    if json_len > body.len() {
        return Err(ModelError::BadRequest(format!(
            "Inference-Header-Content-Length is {json_len} but the body has only {} bytes",
            body.len()
        )));
    }
    let (head, mut rest) = body.split_at(json_len);
    let mut request = InferenceRequest::from_json_limited(head, max_leaves)?;
    let mut inputs = Vec::with_capacity(request.inputs.len());
    for input in &request.inputs {
        let size = input
            .parameters
            .as_ref()
            .and_then(|p| p.get("binary_data_size"))
            .and_then(Value::as_u64);
        let Some(size) = size else {
            inputs.push(input.decode(max_elements)?);
            continue;
        };
        let size = usize::try_from(size).unwrap_or(usize::MAX);
        if size > rest.len() {
            return Err(ModelError::BadData {
                input: input.name.clone(),
                reason: format!(
                    "binary_data_size is {size} but only {} bytes of binary data remain",
                    rest.len()
                ),
            });
        }
        let (bytes, tail) = rest.split_at(size);
        rest = tail;
        let datatype = Datatype::parse(&input.datatype)?;
        let (shape, count) = input.checked_shape(max_elements)?;
        if count * datatype.size_of() != size {
            return Err(ModelError::BadData {
                input: input.name.clone(),
                reason: format!(
                    "binary_data_size is {size} bytes but shape {shape:?} of {datatype} needs {}",
                    count * datatype.size_of()
                ),
            });
        }
        let data =
            TensorData::from_le_bytes(datatype, bytes).map_err(|reason| ModelError::BadData {
                input: input.name.clone(),
                reason,
            })?;
        inputs.push(Tensor::new(input.name.clone(), shape, data)?);
    }
    if !rest.is_empty() {
        return Err(ModelError::BadRequest(format!(
            "{} bytes of binary data are not claimed by any input",
            rest.len()
        )));
    }
    request.drop_data();
    Ok((request, inputs))
}

/// True when the client asked for `output` as binary data.
pub fn wants_binary(request: &InferenceRequest, output: &str) -> bool {
    let requested = request
        .outputs
        .as_ref()
        .and_then(|outs| outs.iter().find(|o| o.name == output))
        .and_then(|o| o.parameters.as_ref())
        .and_then(|p| p.get("binary_data"))
        .and_then(Value::as_bool);
    requested.unwrap_or_else(|| {
        request
            .parameters
            .as_ref()
            .and_then(|p| p.get("binary_data_output"))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    })
}

/// Encodes a response: plain JSON, or, when any output is binary, the JSON header, its length
/// (for `Inference-Header-Content-Length`) and the binary tensors appended.
pub fn encode_response(
    mut response: InferenceResponse,
    request: &InferenceRequest,
) -> (Vec<u8>, Option<usize>) {
    let mut blobs = Vec::new();
    for out in &mut response.outputs {
        if !wants_binary(request, &out.name) {
            continue;
        }
        let ResponseData::Typed(data) = &out.data else {
            continue;
        };
        let bytes = data.to_le_bytes();
        out.parameters
            .get_or_insert_with(Default::default)
            .insert("binary_data_size".into(), json!(bytes.len()));
        out.data = ResponseData::Json(Value::Null);
        blobs.push(bytes);
    }
    let mut body = serde_json::to_vec(&response).unwrap_or_default();
    if blobs.is_empty() {
        return (body, None);
    }
    // Binary outputs carry no `data` member at all.
    if let Ok(mut v) = serde_json::from_slice::<Value>(&body) {
        if let Some(outputs) = v.get_mut("outputs").and_then(Value::as_array_mut) {
            for o in outputs {
                if o.get("data") == Some(&Value::Null)
                    && let Some(obj) = o.as_object_mut()
                {
                    obj.remove("data");
                }
            }
        }
        body = serde_json::to_vec(&v).unwrap_or(body);
    }
    let json_len = body.len();
    for b in blobs {
        body.extend_from_slice(&b);
    }
    (body, Some(json_len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use models::v2::ResponseOutput;

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn binary_inputs_are_split_by_size() {
        let head = br#"{"inputs":[{"name":"a","shape":[2],"datatype":"FP32","parameters":{"binary_data_size":8}},{"name":"b","shape":[1],"datatype":"INT64","data":[7]}]}"#;
        let mut body = head.to_vec();
        body.extend(f32_bytes(&[1.5, -2.0]));
        let (_, inputs) = parse_request(&body, Some(head.len()), 1000).unwrap();
        assert_eq!(inputs[0].as_f32().unwrap(), &[1.5, -2.0]);
        assert_eq!(inputs[1].data(), &TensorData::I64(vec![7]));
    }

    #[test]
    fn sizes_that_do_not_add_up_are_refused() {
        let head = br#"{"inputs":[{"name":"a","shape":[2],"datatype":"FP32","parameters":{"binary_data_size":8}}]}"#;
        let mut body = head.to_vec();
        body.extend([0u8; 4]);
        let err = parse_request(&body, Some(head.len()), 1000).unwrap_err();
        assert!(
            err.to_string()
                .contains("only 4 bytes of binary data remain"),
            "{err}"
        );
        let head2 = br#"{"inputs":[{"name":"a","shape":[3],"datatype":"FP32","parameters":{"binary_data_size":8}}]}"#;
        let mut body = head2.to_vec();
        body.extend([0u8; 8]);
        let err = parse_request(&body, Some(head2.len()), 1000).unwrap_err();
        assert!(err.to_string().contains("needs 12"), "{err}");
        let err = parse_request(b"{}", Some(10), 1000).unwrap_err();
        assert!(
            err.to_string()
                .contains("Inference-Header-Content-Length is 10"),
            "{err}"
        );
        let mut extra = head.to_vec();
        extra.extend([0u8; 12]);
        let err = parse_request(&extra, Some(head.len()), 1000).unwrap_err();
        assert!(
            err.to_string()
                .contains("4 bytes of binary data are not claimed"),
            "{err}"
        );
    }

    #[test]
    fn binary_outputs_when_asked() {
        let request: InferenceRequest = serde_json::from_value(json!({
            "inputs": [],
            "outputs": [{"name": "p", "parameters": {"binary_data": true}}, {"name": "q"}]
        }))
        .unwrap();
        let response = InferenceResponse {
            model_name: "m".into(),
            model_version: None,
            id: None,
            parameters: None,
            outputs: vec![
                ResponseOutput::from_tensor(
                    Tensor::from_f32("p", vec![2], vec![0.25, 0.75]).unwrap(),
                ),
                ResponseOutput::from_tensor(Tensor::from_f32("q", vec![1], vec![1.0]).unwrap()),
            ],
        };
        let (body, json_len) = encode_response(response, &request);
        let json_len = json_len.unwrap();
        let head: Value = serde_json::from_slice(&body[..json_len]).unwrap();
        assert_eq!(head["outputs"][0]["parameters"]["binary_data_size"], 8);
        assert!(head["outputs"][0].get("data").is_none());
        assert_eq!(head["outputs"][1]["data"], json!([1.0]));
        assert_eq!(&body[json_len..], &f32_bytes(&[0.25, 0.75])[..]);
    }
}
