//! DynamoDB JSON: items as the AWS CLI, boto3's low-level client and the DynamoDB API print them,
//! every value wrapped in its type (`{"leaseCounter": {"N": "24"}}`). Used for raw lease dumps and
//! for test fixtures of what the KCL wrote.

use std::collections::HashMap;

use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::AttributeValue;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Map, Value};

use crate::lease::serializer::Item;

/// JSON that is not a DynamoDB item; the message says where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not DynamoDB JSON: {0}")]
pub struct InvalidDynamoJson(String);

/// An item from a JSON object of typed values.
pub fn item_from_json(json: &Value) -> Result<Item, InvalidDynamoJson> {
    let object = json.as_object().ok_or_else(|| InvalidDynamoJson("an item must be a JSON object".into()))?;
    object
        .iter()
        .map(|(name, value)| {
            value_from_json(value).map(|v| (name.clone(), v)).map_err(|e| InvalidDynamoJson(format!("{name}: {}", e.0)))
        })
        .collect()
}

/// The JSON object for an item (attribute order is not kept: items have none).
pub fn item_to_json(item: &Item) -> Value {
    Value::Object(item.iter().map(|(name, value)| (name.clone(), value_to_json(value))).collect())
}

fn value_from_json(json: &Value) -> Result<AttributeValue, InvalidDynamoJson> {
    let bad = |what: &str| InvalidDynamoJson(format!("{what} in {json}"));
    let object = json.as_object().filter(|o| o.len() == 1).ok_or_else(|| bad("expected one {\"<type>\": value}"))?;
    let Some((kind, value)) = object.iter().next() else {
        return Err(bad("expected one {\"<type>\": value}"));
    };
    let text = || value.as_str().map(str::to_owned).ok_or_else(|| bad("expected a string"));
    let texts = || {
        value
            .as_array()
            .and_then(|a| a.iter().map(|v| v.as_str().map(str::to_owned)).collect::<Option<Vec<_>>>())
            .ok_or_else(|| bad("expected an array of strings"))
    };
    let binary = |s: &str| BASE64.decode(s).map(Blob::new).map_err(|_| bad("expected base64"));
    Ok(match kind.as_str() {
        "S" => AttributeValue::S(text()?),
        "N" => AttributeValue::N(text()?),
        "B" => AttributeValue::B(binary(&text()?)?),
        "SS" => AttributeValue::Ss(texts()?),
        "NS" => AttributeValue::Ns(texts()?),
        "BS" => AttributeValue::Bs(texts()?.iter().map(|s| binary(s)).collect::<Result<_, _>>()?),
        "BOOL" => AttributeValue::Bool(value.as_bool().ok_or_else(|| bad("expected true or false"))?),
        "NULL" => AttributeValue::Null(value.as_bool().ok_or_else(|| bad("expected true"))?),
        "L" => AttributeValue::L(
            value
                .as_array()
                .ok_or_else(|| bad("expected an array"))?
                .iter()
                .map(value_from_json)
                .collect::<Result<_, _>>()?,
        ),
        "M" => AttributeValue::M(
            value
                .as_object()
                .ok_or_else(|| bad("expected an object"))?
                .iter()
                .map(|(k, v)| value_from_json(v).map(|v| (k.clone(), v)))
                .collect::<Result<HashMap<_, _>, _>>()?,
        ),
        other => return Err(bad(&format!("unknown type {other:?}"))),
    })
}

fn value_to_json(value: &AttributeValue) -> Value {
    let strings = |values: &[String]| Value::Array(values.iter().map(|s| Value::String(s.clone())).collect());
    let (kind, json) = match value {
        AttributeValue::S(s) => ("S", Value::String(s.clone())),
        AttributeValue::N(n) => ("N", Value::String(n.clone())),
        AttributeValue::B(b) => ("B", Value::String(BASE64.encode(b.as_ref()))),
        AttributeValue::Ss(values) => ("SS", strings(values)),
        AttributeValue::Ns(values) => ("NS", strings(values)),
        AttributeValue::Bs(values) => {
            ("BS", Value::Array(values.iter().map(|b| Value::String(BASE64.encode(b.as_ref()))).collect()))
        }
        AttributeValue::Bool(b) => ("BOOL", Value::Bool(*b)),
        AttributeValue::Null(b) => ("NULL", Value::Bool(*b)),
        AttributeValue::L(values) => ("L", Value::Array(values.iter().map(value_to_json).collect())),
        AttributeValue::M(map) => {
            ("M", Value::Object(map.iter().map(|(k, v)| (k.clone(), value_to_json(v))).collect()))
        }
        // A type newer than this SDK: keep something visible rather than nothing.
        _ => ("unknown", Value::Null),
    };
    Value::Object(Map::from_iter([(kind.to_owned(), json)]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_round_trips() {
        let json = serde_json::json!({
            "s": {"S": "x"}, "n": {"N": "1.5"}, "b": {"B": "AQID"}, "ss": {"SS": ["a", "b"]},
            "ns": {"NS": ["1", "2"]}, "bs": {"BS": ["AQ=="]}, "t": {"BOOL": true}, "z": {"NULL": true},
            "l": {"L": [{"S": "y"}, {"M": {}}]}, "m": {"M": {"k": {"N": "7"}}}
        });
        let item = item_from_json(&json).expect("valid");
        assert_eq!(item["b"], AttributeValue::B(Blob::new(vec![1, 2, 3])));
        assert_eq!(item_to_json(&item), json);
    }

    #[test]
    fn bad_json_is_named() {
        let error = item_from_json(&serde_json::json!({"leaseCounter": {"X": "1"}})).expect_err("unknown type");
        assert!(error.to_string().contains("leaseCounter"), "{error}");
        assert!(item_from_json(&serde_json::json!({"a": {"S": 1}})).is_err());
        assert!(item_from_json(&serde_json::json!([])).is_err());
    }
}
