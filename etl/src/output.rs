//! A job's result as Parquet, and back. The writer's settings are fixed (one row group, zstd level
//! 3, a fixed `created_by`, chunk statistics, every column optional), so the same rows in the same
//! order make the same bytes: the output's SHA-256 in the manifest is then a reproducibility check.

use std::sync::Arc;

use bytes::Bytes;
use parquet::basic::{Compression, ZstdLevel};
use parquet::column::writer::ColumnWriter;
use parquet::data_type::ByteArray;
use parquet::file::properties::{EnabledStatistics, WriterProperties, WriterVersion};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::file::writer::SerializedFileWriter;
use parquet::record::Field;
use parquet::schema::parser::parse_message_type;

use crate::EtlError;
use crate::job::{Column, ColumnType};

/// The `created_by` of every derived file: no library version inside, so a rebuild with another
/// parquet release keeps the bytes as long as the encoding is the same.
pub const DERIVED_CREATED_BY: &str = "ktk-etl";

const ZSTD_LEVEL: i32 = 3;

/// One value of a result row.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Double(f64),
    Text(String),
}

impl Value {
    /// The value as JSON (for `ktk etl show` and the tests).
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Null => serde_json::Value::Null,
            Value::Int(n) => (*n).into(),
            Value::Double(x) => {
                serde_json::Number::from_f64(*x).map_or(serde_json::Value::Null, serde_json::Value::Number)
            }
            Value::Text(s) => s.clone().into(),
        }
    }
}

fn parquet_error(error: parquet::errors::ParquetError) -> EtlError {
    EtlError::Parquet(error.to_string())
}

/// The Parquet message type of a job version's output.
pub fn parquet_schema(name: &str, columns: &[Column]) -> String {
    let mut schema = format!("message {name} {{\n");
    for column in columns {
        let field = match column.column_type {
            ColumnType::String => format!("  optional binary {} (STRING);\n", column.name),
            ColumnType::Bigint => format!("  optional int64 {};\n", column.name),
            ColumnType::Double => format!("  optional double {};\n", column.name),
        };
        schema.push_str(&field);
    }
    schema.push_str("}\n");
    schema
}

/// `rows` (each as long as `columns`, each value of its column's type or null) as one Parquet
/// file.
pub fn write_parquet(name: &str, columns: &[Column], rows: &[Vec<Value>]) -> Result<Vec<u8>, EtlError> {
    let schema = Arc::new(parse_message_type(&parquet_schema(name, columns)).map_err(parquet_error)?);
    let properties = WriterProperties::builder()
        .set_writer_version(WriterVersion::PARQUET_1_0)
        .set_created_by(DERIVED_CREATED_BY.to_owned())
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(ZSTD_LEVEL).map_err(parquet_error)?))
        .set_statistics_enabled(EnabledStatistics::Chunk)
        .build();
    let mut buffer = Vec::new();
    let mut file = SerializedFileWriter::new(&mut buffer, schema, Arc::new(properties)).map_err(parquet_error)?;
    let mut group = file.next_row_group().map_err(parquet_error)?;
    for (index, column) in columns.iter().enumerate() {
        let Some(mut writer) = group.next_column().map_err(parquet_error)? else {
            return Err(EtlError::Parquet("the schema has fewer columns than declared".into()));
        };
        let levels: Vec<i16> =
            rows.iter().map(|row| i16::from(!matches!(row.get(index), None | Some(Value::Null)))).collect();
        let mismatch = |row: usize| {
            EtlError::Parquet(format!("row {row} column {}: not a {} value", column.name, column.column_type.name()))
        };
        match writer.untyped() {
            ColumnWriter::ByteArrayColumnWriter(typed) => {
                let mut values = Vec::new();
                for (row, value) in rows.iter().enumerate() {
                    match value.get(index) {
                        Some(Value::Text(text)) => values.push(ByteArray::from(text.as_str())),
                        None | Some(Value::Null) => {}
                        Some(_) => return Err(mismatch(row)),
                    }
                }
                typed.write_batch(&values, Some(&levels), None).map_err(parquet_error)?;
            }
            ColumnWriter::Int64ColumnWriter(typed) => {
                let mut values = Vec::new();
                for (row, value) in rows.iter().enumerate() {
                    match value.get(index) {
                        Some(Value::Int(n)) => values.push(*n),
                        None | Some(Value::Null) => {}
                        Some(_) => return Err(mismatch(row)),
                    }
                }
                typed.write_batch(&values, Some(&levels), None).map_err(parquet_error)?;
            }
            ColumnWriter::DoubleColumnWriter(typed) => {
                let mut values = Vec::new();
                for (row, value) in rows.iter().enumerate() {
                    match value.get(index) {
                        Some(Value::Double(x)) => values.push(*x),
                        None | Some(Value::Null) => {}
                        Some(_) => return Err(mismatch(row)),
                    }
                }
                typed.write_batch(&values, Some(&levels), None).map_err(parquet_error)?;
            }
            _ => return Err(EtlError::Parquet(format!("column {}: unexpected physical type", column.name))),
        }
        writer.close().map_err(parquet_error)?;
    }
    group.close().map_err(parquet_error)?;
    file.close().map_err(parquet_error)?;
    Ok(buffer)
}

/// The column names and rows of a derived Parquet file.
pub fn read_parquet(body: Bytes) -> Result<(Vec<String>, Vec<Vec<Value>>), EtlError> {
    let reader = SerializedFileReader::new(body).map_err(parquet_error)?;
    let names: Vec<String> =
        reader.metadata().file_metadata().schema_descr().columns().iter().map(|c| c.name().to_owned()).collect();
    let mut rows = Vec::new();
    for row in reader.get_row_iter(None).map_err(parquet_error)? {
        let row = row.map_err(parquet_error)?;
        let mut values = Vec::with_capacity(names.len());
        for (name, field) in row.into_columns() {
            values.push(match field {
                Field::Null => Value::Null,
                Field::Long(n) => Value::Int(n),
                Field::Double(x) => Value::Double(x),
                Field::Str(s) => Value::Text(s),
                other => return Err(EtlError::Parquet(format!("column {name}: unexpected value {other:?}"))),
            });
        }
        rows.push(values);
    }
    Ok((names, rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn columns() -> Vec<Column> {
        vec![
            Column { name: "platform".into(), column_type: ColumnType::String },
            Column { name: "users".into(), column_type: ColumnType::Bigint },
            Column { name: "rate".into(), column_type: ColumnType::Double },
        ]
    }

    fn rows() -> Vec<Vec<Value>> {
        vec![
            vec![Value::Text("PLATFORM_IOS".into()), Value::Int(3), Value::Double(0.25)],
            vec![Value::Text("PLATFORM_WEB".into()), Value::Null, Value::Null],
            vec![Value::Null, Value::Int(-1), Value::Double(1.0)],
        ]
    }

    #[test]
    fn rows_round_trip_with_nulls() {
        let bytes = write_parquet("t_v1", &columns(), &rows()).expect("written");
        let (names, read) = read_parquet(Bytes::from(bytes)).expect("read");
        assert_eq!(names, ["platform", "users", "rate"]);
        assert_eq!(read, rows());
    }

    #[test]
    fn the_same_rows_make_the_same_bytes() {
        let a = write_parquet("t_v1", &columns(), &rows()).expect("written");
        let b = write_parquet("t_v1", &columns(), &rows()).expect("written");
        assert_eq!(a, b);
        let mut other = rows();
        other[0][1] = Value::Int(4);
        assert_ne!(a, write_parquet("t_v1", &columns(), &other).expect("written"));
    }

    #[test]
    fn an_empty_result_is_a_valid_file() {
        let bytes = write_parquet("t_v1", &columns(), &[]).expect("written");
        let (names, read) = read_parquet(Bytes::from(bytes)).expect("read");
        assert_eq!((names.len(), read.len()), (3, 0));
    }

    #[test]
    fn a_value_of_another_type_is_refused() {
        let bad = vec![vec![Value::Int(1), Value::Int(1), Value::Double(1.0)]];
        assert!(write_parquet("t_v1", &columns(), &bad).expect_err("refused").to_string().contains("platform"));
    }
}
