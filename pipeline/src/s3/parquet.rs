//! Parquet events objects: the schema ([`PARQUET_SCHEMA`]), the writer (one row group, zstd pages,
//! a fixed `created_by`, each of the schema's columns written in schema order, found by name) and
//! the reader (by column name, so columns added later are skipped and missing ones leave their
//! field at its default: an object written before `app_id` existed reads with an empty `app_id`).

use std::io::Write;
use std::sync::Arc;

use bytes::Bytes;
use ktk_proto::events::v1::{Event, EventType, Geo, Platform};
use parquet::basic::{Compression, ZstdLevel};
use parquet::data_type::{ByteArray, ByteArrayType, DataType, DoubleType, Int64Type};
use parquet::errors::ParquetError;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::file::writer::{SerializedFileWriter, SerializedRowGroupWriter};
use parquet::record::Field;
use parquet::schema::parser::parse_message_type;
use parquet::schema::types::{ColumnPath, SchemaDescriptor};

use crate::EventRecord;
use crate::time::{from_unix_millis as ms_system_time, unix_millis as system_time_ms};

/// The `created_by` written into every Parquet footer. Fixed (no library version inside), so that
/// the same batch makes the same bytes whichever build writes it, as long as the encoding is the
/// same.
pub const PARQUET_CREATED_BY: &str = "ktk events.v1";

/// The Parquet schema of events objects, in the Parquet message-type syntax. Columns are only
/// ever added (at the end), following the event schema's evolution rules; the reader ignores
/// columns it does not know and leaves fields whose column is missing at their default.
pub const PARQUET_SCHEMA: &str = "
message events_v1 {
  required binary event_id (STRING);
  required binary type (STRING);
  required int64 occurred_at_ms (TIMESTAMP(MILLIS,true));
  required int64 received_at_ms (TIMESTAMP(MILLIS,true));
  required binary user_id (STRING);
  required binary device_id (STRING);
  required binary session_id (STRING);
  required binary platform (STRING);
  required binary app_version (STRING);
  required binary os_version (STRING);
  required binary device_model (STRING);
  required binary content_id (STRING);
  required binary content_title (STRING);
  required int64 position_ms;
  required int64 duration_ms;
  required binary ad_id (STRING);
  required binary ad_break (STRING);
  required binary page (STRING);
  required binary target (STRING);
  required binary error_code (STRING);
  required binary error_message (STRING);
  optional double geo_lat;
  optional double geo_lon;
  optional binary geo_country (STRING);
  optional binary geo_region (STRING);
  required group attributes (MAP) {
    repeated group key_value {
      required binary key (STRING);
      required binary value (STRING);
    }
  }
  required binary schema_version (STRING);
  required binary shard_id (STRING);
  required binary sequence_number (STRING);
  required int64 sub_sequence_number (INTEGER(64,false));
  optional int64 arrival_ms (TIMESTAMP(MILLIS,true));
  required binary app_id (STRING);
}
";

/// zstd level 3: zstd's own default, a good ratio at a speed that keeps up with a shard.
const PARQUET_ZSTD_LEVEL: i32 = 3;

fn enum_name(value: i32, name: Option<&'static str>) -> String {
    // A value this build does not know keeps its number (the schema's evolution rule 3).
    name.map(str::to_owned).unwrap_or_else(|| value.to_string())
}

fn type_name(value: i32) -> String {
    enum_name(value, EventType::try_from(value).ok().map(|t| t.as_str_name()))
}

fn platform_name(value: i32) -> String {
    enum_name(value, Platform::try_from(value).ok().map(|p| p.as_str_name()))
}

fn writer_properties() -> Result<WriterProperties, ParquetError> {
    Ok(WriterProperties::builder()
        .set_created_by(PARQUET_CREATED_BY.to_owned())
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(PARQUET_ZSTD_LEVEL)?))
        .set_statistics_enabled(EnabledStatistics::Chunk)
        // Unique per event: a dictionary would only be built to be thrown away.
        .set_column_dictionary_enabled(ColumnPath::from("event_id"), false)
        .build())
}

pub(super) fn encode_parquet(records: &[&EventRecord]) -> Result<Vec<u8>, String> {
    write_parquet(records).map_err(|e| e.to_string())
}

fn write_parquet(records: &[&EventRecord]) -> Result<Vec<u8>, ParquetError> {
    write_parquet_as(PARQUET_SCHEMA, records)
}

/// Writes `records` as a Parquet file of `schema`: [`PARQUET_SCHEMA`], or (in tests) an earlier
/// version of it, to check that the reader still reads what older builds wrote. Each of the
/// schema's leaf columns is written in schema order, its values chosen by its name; a column this
/// writer does not know is an error.
fn write_parquet_as(schema: &str, records: &[&EventRecord]) -> Result<Vec<u8>, ParquetError> {
    let schema = Arc::new(parse_message_type(schema)?);
    let columns: Vec<String> =
        SchemaDescriptor::new(schema.clone()).columns().iter().map(|c| c.path().string()).collect();
    let mut buffer = Vec::new();
    let mut file = SerializedFileWriter::new(&mut buffer, schema, Arc::new(writer_properties()?))?;
    let mut group = file.next_row_group()?;
    let events: Vec<&Event> = records.iter().map(|r| &r.event).collect();

    // Geo: all four columns null when the event has none.
    let geo_levels: Vec<i16> = events.iter().map(|e| i16::from(e.geo.is_some())).collect();
    let geos: Vec<&Geo> = events.iter().filter_map(|e| e.geo.as_ref()).collect();

    // Attributes: a map, entries in key order. Per event, one level entry for an empty map
    // (definition 0), else one per entry (definition 1; repetition 0 opens the event's map).
    let (mut keys, mut values, mut definitions, mut repetitions) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for event in &events {
        let mut entries: Vec<(&String, &String)> = event.attributes.iter().collect();
        entries.sort_unstable();
        if entries.is_empty() {
            definitions.push(0);
            repetitions.push(0);
        }
        for (index, (key, value)) in entries.into_iter().enumerate() {
            keys.push(ByteArray::from(key.as_str()));
            values.push(ByteArray::from(value.as_str()));
            definitions.push(1);
            repetitions.push(i16::from(index > 0));
        }
    }

    let g = &mut group;
    for column in &columns {
        match column.as_str() {
            "event_id" => strings(g, events.iter().map(|e| e.event_id.as_str()))?,
            "type" => owned_strings(g, events.iter().map(|e| type_name(e.r#type)))?,
            "occurred_at_ms" => longs(g, events.iter().map(|e| e.occurred_at_ms))?,
            "received_at_ms" => longs(g, events.iter().map(|e| e.received_at_ms))?,
            "user_id" => strings(g, events.iter().map(|e| e.user_id.as_str()))?,
            "device_id" => strings(g, events.iter().map(|e| e.device_id.as_str()))?,
            "session_id" => strings(g, events.iter().map(|e| e.session_id.as_str()))?,
            "platform" => owned_strings(g, events.iter().map(|e| platform_name(e.platform)))?,
            "app_version" => strings(g, events.iter().map(|e| e.app_version.as_str()))?,
            "os_version" => strings(g, events.iter().map(|e| e.os_version.as_str()))?,
            "device_model" => strings(g, events.iter().map(|e| e.device_model.as_str()))?,
            "content_id" => strings(g, events.iter().map(|e| e.content_id.as_str()))?,
            "content_title" => strings(g, events.iter().map(|e| e.content_title.as_str()))?,
            "position_ms" => longs(g, events.iter().map(|e| e.position_ms))?,
            "duration_ms" => longs(g, events.iter().map(|e| e.duration_ms))?,
            "ad_id" => strings(g, events.iter().map(|e| e.ad_id.as_str()))?,
            "ad_break" => strings(g, events.iter().map(|e| e.ad_break.as_str()))?,
            "page" => strings(g, events.iter().map(|e| e.page.as_str()))?,
            "target" => strings(g, events.iter().map(|e| e.target.as_str()))?,
            "error_code" => strings(g, events.iter().map(|e| e.error_code.as_str()))?,
            "error_message" => strings(g, events.iter().map(|e| e.error_message.as_str()))?,
            "geo_lat" => {
                let lats: Vec<f64> = geos.iter().map(|geo| geo.lat).collect();
                write_column::<DoubleType, _>(g, &lats, Some(&geo_levels), None)?;
            }
            "geo_lon" => {
                let lons: Vec<f64> = geos.iter().map(|geo| geo.lon).collect();
                write_column::<DoubleType, _>(g, &lons, Some(&geo_levels), None)?;
            }
            "geo_country" => {
                let countries: Vec<ByteArray> = geos.iter().map(|geo| ByteArray::from(geo.country.as_str())).collect();
                write_column::<ByteArrayType, _>(g, &countries, Some(&geo_levels), None)?;
            }
            "geo_region" => {
                let regions: Vec<ByteArray> = geos.iter().map(|geo| ByteArray::from(geo.region.as_str())).collect();
                write_column::<ByteArrayType, _>(g, &regions, Some(&geo_levels), None)?;
            }
            "attributes.key_value.key" => {
                write_column::<ByteArrayType, _>(g, &keys, Some(&definitions), Some(&repetitions))?;
            }
            "attributes.key_value.value" => {
                write_column::<ByteArrayType, _>(g, &values, Some(&definitions), Some(&repetitions))?;
            }
            "schema_version" => strings(g, events.iter().map(|e| e.schema_version.as_str()))?,
            "shard_id" => strings(g, records.iter().map(|r| r.shard_id.as_str()))?,
            "sequence_number" => strings(g, records.iter().map(|r| r.sequence_number.as_str()))?,
            // The bits of an unsigned 64-bit integer (the column's logical type says so).
            "sub_sequence_number" => longs(g, records.iter().map(|r| r.sub_sequence_number as i64))?,
            "arrival_ms" => {
                let arrival_levels: Vec<i16> = records.iter().map(|r| i16::from(r.arrival.is_some())).collect();
                let arrivals: Vec<i64> = records.iter().filter_map(|r| r.arrival.map(system_time_ms)).collect();
                write_column::<Int64Type, _>(g, &arrivals, Some(&arrival_levels), None)?;
            }
            "app_id" => strings(g, events.iter().map(|e| e.app_id.as_str()))?,
            other => return Err(ParquetError::General(format!("the writer has no values for column {other}"))),
        }
    }

    group.close()?;
    file.close()?;
    Ok(buffer)
}

fn strings<'a, W: Write + Send>(
    group: &mut SerializedRowGroupWriter<'_, W>,
    values: impl Iterator<Item = &'a str>,
) -> Result<(), ParquetError> {
    let values: Vec<ByteArray> = values.map(ByteArray::from).collect();
    write_column::<ByteArrayType, W>(group, &values, None, None)
}

fn owned_strings<W: Write + Send>(
    group: &mut SerializedRowGroupWriter<'_, W>,
    values: impl Iterator<Item = String>,
) -> Result<(), ParquetError> {
    let values: Vec<ByteArray> = values.map(|value| ByteArray::from(value.into_bytes())).collect();
    write_column::<ByteArrayType, W>(group, &values, None, None)
}

fn longs<W: Write + Send>(
    group: &mut SerializedRowGroupWriter<'_, W>,
    values: impl Iterator<Item = i64>,
) -> Result<(), ParquetError> {
    write_column::<Int64Type, W>(group, &values.collect::<Vec<_>>(), None, None)
}

fn write_column<T: DataType, W: Write + Send>(
    group: &mut SerializedRowGroupWriter<'_, W>,
    values: &[T::T],
    definitions: Option<&[i16]>,
    repetitions: Option<&[i16]>,
) -> Result<(), ParquetError> {
    let Some(mut column) = group.next_column()? else {
        return Err(ParquetError::General("more columns written than the schema has".into()));
    };
    column.typed::<T>().write_batch(values, definitions, repetitions)?;
    column.close()
}

pub(super) fn read_parquet(body: Bytes) -> Result<Vec<EventRecord>, ParquetError> {
    let reader = SerializedFileReader::new(body)?;
    let mut records = Vec::new();
    for row in reader.get_row_iter(None)? {
        let mut record = EventRecord {
            event: Event::default(),
            shard_id: String::new(),
            sequence_number: String::new(),
            sub_sequence_number: 0,
            arrival: None,
        };
        let event = &mut record.event;
        for (name, field) in row?.into_columns() {
            if matches!(field, Field::Null) {
                continue;
            }
            let bad = |what: &str| ParquetError::General(format!("column {name}: expected {what}, found {field:?}"));
            let string = || match &field {
                Field::Str(s) => Ok(s.clone()),
                _ => Err(bad("a string")),
            };
            let long = || match &field {
                Field::Long(n) | Field::TimestampMillis(n) => Ok(*n),
                _ => Err(bad("a 64-bit integer")),
            };
            let double = || match &field {
                Field::Double(n) => Ok(*n),
                _ => Err(bad("a double")),
            };
            match name.as_str() {
                "event_id" => event.event_id = string()?,
                "type" => {
                    let name = string()?;
                    let known = EventType::from_str_name(&name).map(|t| t as i32);
                    event.r#type = enum_value(&name, known).ok_or_else(|| bad("an event type"))?;
                }
                "occurred_at_ms" => event.occurred_at_ms = long()?,
                "received_at_ms" => event.received_at_ms = long()?,
                "user_id" => event.user_id = string()?,
                "device_id" => event.device_id = string()?,
                "session_id" => event.session_id = string()?,
                "platform" => {
                    let name = string()?;
                    let known = Platform::from_str_name(&name).map(|p| p as i32);
                    event.platform = enum_value(&name, known).ok_or_else(|| bad("a platform"))?;
                }
                "app_version" => event.app_version = string()?,
                "os_version" => event.os_version = string()?,
                "device_model" => event.device_model = string()?,
                "content_id" => event.content_id = string()?,
                "content_title" => event.content_title = string()?,
                "position_ms" => event.position_ms = long()?,
                "duration_ms" => event.duration_ms = long()?,
                "ad_id" => event.ad_id = string()?,
                "ad_break" => event.ad_break = string()?,
                "page" => event.page = string()?,
                "target" => event.target = string()?,
                "error_code" => event.error_code = string()?,
                "error_message" => event.error_message = string()?,
                "geo_lat" => event.geo.get_or_insert_default().lat = double()?,
                "geo_lon" => event.geo.get_or_insert_default().lon = double()?,
                "geo_country" => event.geo.get_or_insert_default().country = string()?,
                "geo_region" => event.geo.get_or_insert_default().region = string()?,
                "attributes" => {
                    let Field::MapInternal(map) = &field else { return Err(bad("a map")) };
                    for (key, value) in map.entries() {
                        match (key, value) {
                            (Field::Str(key), Field::Str(value)) => {
                                event.attributes.insert(key.clone(), value.clone());
                            }
                            _ => return Err(bad("a map of strings")),
                        }
                    }
                }
                "schema_version" => event.schema_version = string()?,
                "shard_id" => record.shard_id = string()?,
                "sequence_number" => record.sequence_number = string()?,
                "sub_sequence_number" => {
                    record.sub_sequence_number = match &field {
                        Field::ULong(n) => *n,
                        Field::Long(n) => *n as u64,
                        _ => return Err(bad("an unsigned 64-bit integer")),
                    }
                }
                "arrival_ms" => record.arrival = Some(ms_system_time(long()?)),
                "app_id" => event.app_id = string()?,
                // A column added after this build: its field is unknown here.
                _ => {}
            }
        }
        records.push(record);
    }
    Ok(records)
}

/// An enum column's value: the name this build knows, or the number it was written as.
fn enum_value(text: &str, known: Option<i32>) -> Option<i32> {
    known.or_else(|| text.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{T_10_59, batch, record};
    use super::super::{S3Format, encode_batch};
    use super::*;

    #[test]
    fn parquet_columns_are_typed() {
        let objects = encode_batch(&batch(vec![record(1, T_10_59)]), "p", S3Format::Parquet).expect("encode");
        let reader = SerializedFileReader::new(objects[0].body.clone()).expect("parquet");
        let schema = reader.metadata().file_metadata().schema_descr();
        let column = |name: &str| {
            (0..schema.num_columns())
                .map(|i| schema.column(i))
                .find(|c| c.path().string() == name)
                .unwrap_or_else(|| panic!("no column {name}"))
        };
        use parquet::basic::{LogicalType, Type as Physical};
        assert_eq!(column("occurred_at_ms").physical_type(), Physical::INT64);
        assert!(matches!(column("occurred_at_ms").logical_type_ref(), Some(LogicalType::Timestamp { .. })));
        assert!(matches!(column("type").logical_type_ref(), Some(LogicalType::String)));
        assert_eq!(column("geo_lat").physical_type(), Physical::DOUBLE);
        assert_eq!(column("attributes.key_value.value").max_rep_level(), 1);
        assert!(matches!(
            column("sub_sequence_number").logical_type_ref(),
            Some(LogicalType::Integer(int)) if !int.is_signed
        ));
        let compression = reader.metadata().row_group(0).column(0).compression();
        assert!(matches!(compression, Compression::ZSTD(_)), "{compression:?}");
        assert!(matches!(column("app_id").logical_type_ref(), Some(LogicalType::String)));
        assert_eq!(schema.column(schema.num_columns() - 1).path().string(), "app_id", "columns are added at the end");
    }

    /// The schema of the builds before `app_id`: [`PARQUET_SCHEMA`] without its last column.
    fn schema_before_app_id() -> String {
        let line = "  required binary app_id (STRING);\n";
        assert!(PARQUET_SCHEMA.contains(line), "the app_id column moved: update this test");
        PARQUET_SCHEMA.replace(line, "")
    }

    #[test]
    fn objects_written_before_app_id_existed_read_with_an_empty_app_id() {
        let mut records: Vec<EventRecord> = (0..6).map(|i| record(i, T_10_59 + i as i64)).collect();
        let older = write_parquet_as(&schema_before_app_id(), &records.iter().collect::<Vec<_>>()).expect("write");
        let older = Bytes::from(older);
        let reader = SerializedFileReader::new(older.clone()).expect("parquet");
        let schema = reader.metadata().file_metadata().schema_descr();
        let names: Vec<String> = (0..schema.num_columns()).map(|i| schema.column(i).path().string()).collect();
        assert!(!names.iter().any(|name| name == "app_id"), "{names:?}");
        assert_eq!(names.last().map(String::as_str), Some("arrival_ms"));

        let read = read_parquet(older).expect("an older object reads");
        assert!(records.iter().all(|r| r.event.app_id == "tv-roku"));
        for record in &mut records {
            record.event.app_id.clear();
        }
        assert_eq!(read, records, "every other field as written, app_id empty");
    }

    #[test]
    fn current_objects_carry_the_app_id() {
        let mut records: Vec<EventRecord> = (0..3).map(|i| record(i, T_10_59)).collect();
        records[1].event.app_id = "tv-web".into();
        records[2].event.app_id.clear();
        let bytes = write_parquet(&records.iter().collect::<Vec<_>>()).expect("write");
        let read = read_parquet(Bytes::from(bytes)).expect("read");
        let app_ids: Vec<&str> = read.iter().map(|r| r.event.app_id.as_str()).collect();
        assert_eq!(app_ids, ["tv-roku", "tv-web", ""]);
    }

    #[test]
    fn a_column_the_writer_has_no_values_for_is_an_error() {
        let schema =
            PARQUET_SCHEMA.replace("message events_v1 {", "message events_v1 {\n  required binary mood (STRING);");
        let error = write_parquet_as(&schema, &[&record(1, T_10_59)]).expect_err("no values for mood");
        assert!(error.to_string().contains("column mood"), "{error}");
    }
}
