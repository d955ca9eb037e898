//! Parquet events objects: the schema ([`PARQUET_SCHEMA`]), the writer (one row group, zstd pages,
//! a fixed `created_by`, each of the schema's columns written in schema order, found by name) and
//! the reader (columnar: each row group's column chunks decoded by parquet's column readers into
//! the rows' records; by column name, so columns added later are skipped and missing ones leave
//! their field at its default: an object written before `app_id` existed reads with an empty
//! `app_id`).

use std::io::Write;
use std::sync::Arc;

use bytes::Bytes;
use ktk_proto::events::v1::{Event, EventType, Geo, Platform};
use parquet::basic::{Compression, ConvertedType, ZstdLevel};
use parquet::column::reader::{ColumnReader, ColumnReaderImpl};
use parquet::data_type::{ByteArray, ByteArrayType, DataType, DoubleType, Int64Type};
use parquet::errors::ParquetError;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::file::reader::{FileReader, RowGroupReader, SerializedFileReader};
use parquet::file::writer::{SerializedFileWriter, SerializedRowGroupWriter};
use parquet::schema::parser::parse_message_type;
use parquet::schema::types::{ColumnDescriptor, ColumnPath, SchemaDescriptor};

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
/// version of it, to check that the reader still reads what older builds wrote.
fn write_parquet_as(schema: &str, records: &[&EventRecord]) -> Result<Vec<u8>, ParquetError> {
    write_row_groups(schema, writer_properties()?, &[records])
}

/// Writes a Parquet file of `schema` with one row group per item of `groups` (the sink writes one;
/// tests write several, and small pages, to check that the reader reads them all). Each of the
/// schema's leaf columns is written in schema order, its values chosen by its name; a column this
/// writer does not know is an error.
fn write_row_groups(
    schema: &str,
    properties: WriterProperties,
    groups: &[&[&EventRecord]],
) -> Result<Vec<u8>, ParquetError> {
    let schema = Arc::new(parse_message_type(schema)?);
    let columns: Vec<String> =
        SchemaDescriptor::new(schema.clone()).columns().iter().map(|c| c.path().string()).collect();
    let mut buffer = Vec::new();
    let mut file = SerializedFileWriter::new(&mut buffer, schema, Arc::new(properties))?;
    for records in groups {
        let group = file.next_row_group()?;
        write_row_group(group, &columns, records)?;
    }
    file.close()?;
    Ok(buffer)
}

fn write_row_group<W: Write + Send>(
    mut group: SerializedRowGroupWriter<'_, W>,
    columns: &[String],
    records: &[&EventRecord],
) -> Result<(), ParquetError> {
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
    for column in columns {
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
    Ok(())
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

/// How many records a column reader decodes at a time: bounds the reader's buffers whatever the
/// size of a row group.
const READ_BATCH: usize = 4096;

/// Reads an events object column by column: each row group's records are made empty, then each
/// column this build knows fills its field in every record (found by its leaf path; a column this
/// build does not know is not decoded; a column that is missing leaves its field at its default).
/// The most rows an events object may claim: records are allocated from the footer's row counts
/// before any value is read, so a corrupt or hostile footer must not decide the allocation. A
/// batch of the sink is far below it (`KTK_BATCH_MAX_RECORDS`).
const MAX_ROWS_PER_OBJECT: usize = 10_000_000;

pub(super) fn read_parquet(body: Bytes) -> Result<Vec<EventRecord>, ParquetError> {
    let reader = SerializedFileReader::new(body)?;
    let mut records = Vec::new();
    for index in 0..reader.num_row_groups() {
        let group = reader.get_row_group(index)?;
        let rows = usize::try_from(group.metadata().num_rows())
            .map_err(|_| ParquetError::General(format!("row group {index}: a negative number of rows")))?;
        if rows > MAX_ROWS_PER_OBJECT.saturating_sub(records.len()) {
            return Err(ParquetError::General(format!(
                "the object claims more than {MAX_ROWS_PER_OBJECT} rows; not an events object of the sink"
            )));
        }
        let start = records.len();
        records.resize_with(start + rows, empty_record);
        if let Some(rows) = records.get_mut(start..) {
            read_row_group(group.as_ref(), rows)?;
        }
    }
    Ok(records)
}

fn empty_record() -> EventRecord {
    EventRecord {
        event: Event::default(),
        shard_id: String::new(),
        sequence_number: String::new(),
        sub_sequence_number: 0,
        arrival: None,
    }
}

/// Fills `records`, the row group's rows, from the columns of the row group this build knows.
fn read_row_group(group: &dyn RowGroupReader, records: &mut [EventRecord]) -> Result<(), ParquetError> {
    let schema = group.metadata().schema_descr();
    let (mut keys, mut values) = (None, None);
    for index in 0..schema.num_columns() {
        let column = schema.column(index);
        let c = column.as_ref();
        let reader = || group.get_column_reader(index);
        match column.path().string().as_str() {
            "event_id" => text_field(c, reader()?, records, |r| &mut r.event.event_id)?,
            "type" => each_text(c, reader()?, records, |record, text| {
                let known = EventType::from_str_name(text).map(|t| t as i32);
                record.event.r#type = enum_value(text, known).ok_or_else(|| bad_value(c, "an event type", text))?;
                Ok(())
            })?,
            "occurred_at_ms" => long_field(c, reader()?, records, |r| &mut r.event.occurred_at_ms)?,
            "received_at_ms" => long_field(c, reader()?, records, |r| &mut r.event.received_at_ms)?,
            "user_id" => text_field(c, reader()?, records, |r| &mut r.event.user_id)?,
            "device_id" => text_field(c, reader()?, records, |r| &mut r.event.device_id)?,
            "session_id" => text_field(c, reader()?, records, |r| &mut r.event.session_id)?,
            "platform" => each_text(c, reader()?, records, |record, text| {
                let known = Platform::from_str_name(text).map(|p| p as i32);
                record.event.platform = enum_value(text, known).ok_or_else(|| bad_value(c, "a platform", text))?;
                Ok(())
            })?,
            "app_version" => text_field(c, reader()?, records, |r| &mut r.event.app_version)?,
            "os_version" => text_field(c, reader()?, records, |r| &mut r.event.os_version)?,
            "device_model" => text_field(c, reader()?, records, |r| &mut r.event.device_model)?,
            "content_id" => text_field(c, reader()?, records, |r| &mut r.event.content_id)?,
            "content_title" => text_field(c, reader()?, records, |r| &mut r.event.content_title)?,
            "position_ms" => long_field(c, reader()?, records, |r| &mut r.event.position_ms)?,
            "duration_ms" => long_field(c, reader()?, records, |r| &mut r.event.duration_ms)?,
            "ad_id" => text_field(c, reader()?, records, |r| &mut r.event.ad_id)?,
            "ad_break" => text_field(c, reader()?, records, |r| &mut r.event.ad_break)?,
            "page" => text_field(c, reader()?, records, |r| &mut r.event.page)?,
            "target" => text_field(c, reader()?, records, |r| &mut r.event.target)?,
            "error_code" => text_field(c, reader()?, records, |r| &mut r.event.error_code)?,
            "error_message" => text_field(c, reader()?, records, |r| &mut r.event.error_message)?,
            // Any defined geo value makes the event's geo (its other fields at their default).
            "geo_lat" => double_field(c, reader()?, records, |r| &mut r.event.geo.get_or_insert_default().lat)?,
            "geo_lon" => double_field(c, reader()?, records, |r| &mut r.event.geo.get_or_insert_default().lon)?,
            "geo_country" => text_field(c, reader()?, records, |r| &mut r.event.geo.get_or_insert_default().country)?,
            "geo_region" => text_field(c, reader()?, records, |r| &mut r.event.geo.get_or_insert_default().region)?,
            "attributes.key_value.key" => keys = Some((column.clone(), reader()?)),
            "attributes.key_value.value" => values = Some((column.clone(), reader()?)),
            "schema_version" => text_field(c, reader()?, records, |r| &mut r.event.schema_version)?,
            "shard_id" => text_field(c, reader()?, records, |r| &mut r.shard_id)?,
            "sequence_number" => text_field(c, reader()?, records, |r| &mut r.sequence_number)?,
            "sub_sequence_number" => match reader()? {
                // The bits of an unsigned 64-bit integer, or (not so annotated) a signed one.
                ColumnReader::Int64ColumnReader(reader)
                    if matches!(
                        c.converted_type(),
                        ConvertedType::NONE | ConvertedType::INT_64 | ConvertedType::UINT_64
                    ) =>
                {
                    scan(c, reader, records, |record, value| {
                        record.sub_sequence_number = *value as u64;
                        Ok(())
                    })?
                }
                _ => return Err(wrong_type(c, "an unsigned 64-bit integer")),
            },
            "arrival_ms" => {
                each_long(c, reader()?, records, |record, millis| record.arrival = Some(ms_system_time(millis)))?
            }
            "app_id" => text_field(c, reader()?, records, |r| &mut r.event.app_id)?,
            // A column added after this build: its field is unknown here.
            _ => {}
        }
    }
    match (keys, values) {
        (Some((key_column, keys)), Some((value_column, values))) => {
            attributes(MapColumn::new(&key_column, keys)?, MapColumn::new(&value_column, values)?, records)
        }
        (None, None) => Ok(()),
        (Some((column, _)), None) | (None, Some((column, _))) => {
            Err(column_error(&column, "the map attributes has only this one of its key and value columns"))
        }
    }
}

fn column_error(column: &ColumnDescriptor, message: impl std::fmt::Display) -> ParquetError {
    ParquetError::General(format!("column {}: {message}", column.path().string()))
}

fn wrong_type(column: &ColumnDescriptor, what: &str) -> ParquetError {
    let found = format!("{:?} {:?}", column.physical_type(), column.converted_type());
    column_error(column, format_args!("expected {what}, found a column of type {found}"))
}

fn bad_value(column: &ColumnDescriptor, what: &str, text: &str) -> ParquetError {
    column_error(column, format_args!("expected {what}, found {text:?}"))
}

/// Text: a BYTE_ARRAY column annotated as a string (or an enum or JSON), each value UTF-8.
fn is_text(column: &ColumnDescriptor) -> bool {
    matches!(column.converted_type(), ConvertedType::UTF8 | ConvertedType::ENUM | ConvertedType::JSON)
}

fn utf8<'a>(column: &ColumnDescriptor, value: &'a ByteArray) -> Result<&'a str, ParquetError> {
    value.as_utf8().map_err(|e| column_error(column, format_args!("not UTF-8: {e}")))
}

/// Calls `visit` with each row's defined value of a text column.
fn each_text(
    column: &ColumnDescriptor,
    reader: ColumnReader,
    records: &mut [EventRecord],
    mut visit: impl FnMut(&mut EventRecord, &str) -> Result<(), ParquetError>,
) -> Result<(), ParquetError> {
    match reader {
        ColumnReader::ByteArrayColumnReader(reader) if is_text(column) => {
            scan(column, reader, records, |record, value| visit(record, utf8(column, value)?))
        }
        _ => Err(wrong_type(column, "a string")),
    }
}

fn text_field(
    column: &ColumnDescriptor,
    reader: ColumnReader,
    records: &mut [EventRecord],
    field: fn(&mut EventRecord) -> &mut String,
) -> Result<(), ParquetError> {
    each_text(column, reader, records, |record, text| {
        text.clone_into(field(record));
        Ok(())
    })
}

/// Calls `visit` with each row's defined value of a 64-bit integer column (plain or millisecond
/// timestamps; INT96 timestamps as milliseconds).
fn each_long(
    column: &ColumnDescriptor,
    reader: ColumnReader,
    records: &mut [EventRecord],
    mut visit: impl FnMut(&mut EventRecord, i64),
) -> Result<(), ParquetError> {
    match reader {
        ColumnReader::Int64ColumnReader(reader)
            if matches!(
                column.converted_type(),
                ConvertedType::NONE | ConvertedType::INT_64 | ConvertedType::TIMESTAMP_MILLIS
            ) =>
        {
            scan(column, reader, records, |record, value| {
                visit(record, *value);
                Ok(())
            })
        }
        ColumnReader::Int96ColumnReader(reader) => scan(column, reader, records, |record, value| {
            visit(record, value.to_millis());
            Ok(())
        }),
        _ => Err(wrong_type(column, "a 64-bit integer")),
    }
}

fn long_field(
    column: &ColumnDescriptor,
    reader: ColumnReader,
    records: &mut [EventRecord],
    field: fn(&mut EventRecord) -> &mut i64,
) -> Result<(), ParquetError> {
    each_long(column, reader, records, |record, value| *field(record) = value)
}

fn double_field(
    column: &ColumnDescriptor,
    reader: ColumnReader,
    records: &mut [EventRecord],
    field: fn(&mut EventRecord) -> &mut f64,
) -> Result<(), ParquetError> {
    match reader {
        ColumnReader::DoubleColumnReader(reader) => scan(column, reader, records, |record, value| {
            *field(record) = *value;
            Ok(())
        }),
        _ => Err(wrong_type(column, "a double")),
    }
}

/// Reads a column of one value per row, calling `visit` with each row's record and its value
/// when it is defined (a null leaves the record as it is). The column must have exactly one
/// value or null per record.
fn scan<T: DataType>(
    column: &ColumnDescriptor,
    mut reader: ColumnReaderImpl<T>,
    records: &mut [EventRecord],
    mut visit: impl FnMut(&mut EventRecord, &T::T) -> Result<(), ParquetError>,
) -> Result<(), ParquetError> {
    if column.max_rep_level() != 0 {
        return Err(column_error(column, "expected one value per row, found a repeated column"));
    }
    let max_definition = column.max_def_level();
    let (mut definitions, mut values) = (Vec::new(), Vec::new());
    let mut rows = records.iter_mut();
    loop {
        definitions.clear();
        values.clear();
        let (read, _, _) = reader
            .read_records(READ_BATCH, Some(&mut definitions), None, &mut values)
            .map_err(|e| column_error(column, e))?;
        if read == 0 {
            break;
        }
        let too_many = || column_error(column, "more values than the row group has rows");
        if max_definition == 0 {
            for value in &values {
                visit(rows.next().ok_or_else(too_many)?, value)?;
            }
        } else {
            let mut values = values.iter();
            for &definition in &definitions {
                let record = rows.next().ok_or_else(too_many)?;
                if definition == max_definition {
                    let value =
                        values.next().ok_or_else(|| column_error(column, "fewer values than definition levels"))?;
                    visit(record, value)?;
                }
            }
        }
    }
    match rows.len() {
        0 => Ok(()),
        missing => Err(column_error(column, format_args!("{missing} rows of the row group have no value"))),
    }
}

/// One of the two leaf columns of the attributes map, read a batch of records at a time.
struct MapColumn<'a> {
    column: &'a ColumnDescriptor,
    reader: ColumnReaderImpl<ByteArrayType>,
    definitions: Vec<i16>,
    repetitions: Vec<i16>,
    values: Vec<ByteArray>,
}

impl<'a> MapColumn<'a> {
    fn new(column: &'a ColumnDescriptor, reader: ColumnReader) -> Result<Self, ParquetError> {
        match reader {
            ColumnReader::ByteArrayColumnReader(reader) if is_text(column) && column.max_rep_level() == 1 => {
                Ok(Self { column, reader, definitions: Vec::new(), repetitions: Vec::new(), values: Vec::new() })
            }
            _ => Err(wrong_type(column, "the strings of a map")),
        }
    }

    /// Reads the next batch of whole records: how many.
    fn read(&mut self) -> Result<usize, ParquetError> {
        self.definitions.clear();
        self.repetitions.clear();
        self.values.clear();
        let (read, _, _) = self
            .reader
            .read_records(READ_BATCH, Some(&mut self.definitions), Some(&mut self.repetitions), &mut self.values)
            .map_err(|e| column_error(self.column, e))?;
        Ok(read)
    }
}

/// The attributes map: per row, either one level with a definition level below the maximum (an
/// empty map) or one level per entry, the first of the row with repetition level 0.
fn attributes(
    mut keys: MapColumn<'_>,
    mut values: MapColumn<'_>,
    records: &mut [EventRecord],
) -> Result<(), ParquetError> {
    let mut rows = records.iter_mut();
    let mut record = None;
    loop {
        let read = keys.read()?;
        if values.read()? != read || values.repetitions != keys.repetitions {
            return Err(column_error(values.column, "its entries do not match those of the map's keys"));
        }
        if read == 0 {
            break;
        }
        let (mut key_values, mut value_values) = (keys.values.iter(), values.values.iter());
        let levels = keys.repetitions.iter().zip(&keys.definitions).zip(&values.definitions);
        for ((&repetition, &key_definition), &value_definition) in levels {
            if repetition == 0 {
                record =
                    Some(rows.next().ok_or_else(|| column_error(keys.column, "more rows than the row group has"))?);
            }
            let Some(record) = record.as_deref_mut() else {
                return Err(column_error(keys.column, "a row that starts with a repeated entry"));
            };
            let has_key = key_definition == keys.column.max_def_level();
            let has_value = value_definition == values.column.max_def_level();
            match (has_key, has_value) {
                (true, true) => {
                    let missing = "fewer values than definition levels";
                    let key = key_values.next().ok_or_else(|| column_error(keys.column, missing))?;
                    let value = value_values.next().ok_or_else(|| column_error(values.column, missing))?;
                    record
                        .event
                        .attributes
                        .insert(utf8(keys.column, key)?.to_owned(), utf8(values.column, value)?.to_owned());
                }
                (false, false) => {}
                (true, false) => return Err(column_error(values.column, "an entry of the map without its value")),
                (false, true) => return Err(column_error(keys.column, "an entry of the map without its key")),
            }
        }
    }
    match rows.len() {
        0 => Ok(()),
        missing => Err(column_error(keys.column, format_args!("{missing} rows of the row group have no value"))),
    }
}

/// An enum column's value: the name this build knows, or the number it was written as.
fn enum_value(text: &str, known: Option<i32>) -> Option<i32> {
    known.or_else(|| text.parse().ok())
}

#[cfg(test)]
mod tests {
    use parquet::data_type::Int32Type;
    use parquet::record::Field;
    use proptest::prelude::*;

    use super::super::fixtures::{T_10_59, arb_record, batch, record};
    use super::super::{S3Format, encode_batch};
    use super::*;

    /// The reader as it was before the columnar one: parquet's record API, one `Field` per column
    /// per row. An independent oracle for [`read_parquet`].
    fn read_parquet_rows(body: Bytes) -> Result<Vec<EventRecord>, ParquetError> {
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
                let bad =
                    |what: &str| ParquetError::General(format!("column {name}: expected {what}, found {field:?}"));
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

    /// Small pages: a page per few rows (and a dictionary page of a few values), so that values,
    /// and a map's entries, are read across page boundaries.
    fn small_pages(rows_per_page: usize) -> WriterProperties {
        writer_properties()
            .expect("properties")
            .into_builder()
            .set_write_batch_size(rows_per_page)
            .set_data_page_row_count_limit(rows_per_page)
            .set_dictionary_page_size_limit(64)
            .build()
    }

    /// Every field set, and the edge cases: unknown enum values, an empty event, geo present but
    /// all zero, no attributes, the largest sub-sequence number, times before 1970.
    fn varied_records(count: u64) -> Vec<EventRecord> {
        let mut records: Vec<EventRecord> = (0..count).map(|i| record(i, T_10_59 + i as i64)).collect();
        records[1].event.r#type = 999;
        records[1].event.platform = -7;
        records[2].event = Event { event_id: "bare".into(), occurred_at_ms: T_10_59, ..Event::default() };
        records[3].event.geo = Some(Geo::default());
        records[4].event.attributes.clear();
        records[5].sub_sequence_number = u64::MAX;
        records[6].arrival = Some(ms_system_time(-1_234));
        records[7].event.received_at_ms = -86_400_001;
        records
    }

    fn row_groups<'a>(records: &'a [EventRecord], sizes: &[usize]) -> Vec<Vec<&'a EventRecord>> {
        let mut rest: Vec<&EventRecord> = records.iter().collect();
        let mut groups = Vec::new();
        for &size in sizes {
            let tail = rest.split_off(size.min(rest.len()));
            groups.push(std::mem::replace(&mut rest, tail));
        }
        groups.push(rest);
        groups
    }

    #[test]
    fn every_row_group_and_every_page_is_read() {
        let records = varied_records(50);
        // Three row groups, the second empty.
        let groups = row_groups(&records, &[7, 0]);
        let groups: Vec<&[&EventRecord]> = groups.iter().map(Vec::as_slice).collect();
        let bytes = Bytes::from(write_row_groups(PARQUET_SCHEMA, small_pages(3), &groups).expect("write"));

        let reader = SerializedFileReader::new(bytes.clone()).expect("parquet");
        let rows: Vec<i64> = reader.metadata().row_groups().iter().map(|g| g.num_rows()).collect();
        assert_eq!(rows, [7, 0, 43]);
        let schema = reader.metadata().file_metadata().schema_descr();
        let key = (0..schema.num_columns())
            .find(|&i| schema.column(i).path().string() == "attributes.key_value.key")
            .expect("the key column");
        let pages = reader.get_row_group(2).expect("group").get_column_page_reader(key).expect("pages").count();
        assert!(pages > 10, "{pages} pages");

        let read = read_parquet(bytes.clone()).expect("read");
        assert_eq!(read, records);
        assert_eq!(read, read_parquet_rows(bytes).expect("the record API reads it"));
    }

    #[test]
    fn a_row_group_longer_than_a_read_batch_reads_whole() {
        let records = varied_records((2 * READ_BATCH + 3).max(8) as u64);
        let bytes = Bytes::from(write_parquet(&records.iter().collect::<Vec<_>>()).expect("write"));
        assert_eq!(read_parquet(bytes).expect("read"), records);
    }

    /// A file of `schema` whose one row group `write` writes, column by column.
    fn write_raw(
        schema: &str,
        write: impl FnOnce(&mut SerializedRowGroupWriter<'_, &mut Vec<u8>>) -> Result<(), ParquetError>,
    ) -> Bytes {
        let schema = Arc::new(parse_message_type(schema).expect("schema"));
        let mut buffer = Vec::new();
        let mut file =
            SerializedFileWriter::new(&mut buffer, schema, Arc::new(writer_properties().expect("properties")))
                .expect("writer");
        let mut group = file.next_row_group().expect("group");
        write(&mut group).expect("columns");
        group.close().expect("group");
        file.close().expect("file");
        Bytes::from(buffer)
    }

    fn texts_of(values: &[&[u8]]) -> Vec<ByteArray> {
        values.iter().map(|v| ByteArray::from(v.to_vec())).collect()
    }

    #[test]
    fn unknown_columns_are_skipped_and_a_lone_geo_value_makes_a_geo() {
        let schema = "message m {
            required binary mood (STRING);
            required binary event_id (STRING);
            optional binary geo_country (STRING);
            optional int64 later_count;
        }";
        let bytes = write_raw(schema, |g| {
            write_column::<ByteArrayType, _>(g, &texts_of(&[b"happy", b"sad"]), None, None)?;
            write_column::<ByteArrayType, _>(g, &texts_of(&[b"a", b"b"]), None, None)?;
            write_column::<ByteArrayType, _>(g, &texts_of(&[b"FR"]), Some(&[0, 1]), None)?;
            write_column::<Int64Type, _>(g, &[3], Some(&[1, 0]), None)
        });
        let read = read_parquet(bytes.clone()).expect("read");
        assert_eq!(read, read_parquet_rows(bytes).expect("rows"));
        let events: Vec<(&str, Option<&Geo>)> =
            read.iter().map(|r| (r.event.event_id.as_str(), r.event.geo.as_ref())).collect();
        let france = Geo { country: "FR".into(), ..Geo::default() };
        assert_eq!(events, [("a", None), ("b", Some(&france))]);
    }

    #[test]
    fn enum_columns_read_names_or_numbers_and_refuse_other_text() {
        let schema = "message m { required binary type (STRING); required binary platform (STRING); }";
        let file = |types: &[&[u8]], platforms: &[&[u8]]| {
            let (types, platforms) = (texts_of(types), texts_of(platforms));
            write_raw(schema, |g| {
                write_column::<ByteArrayType, _>(g, &types, None, None)?;
                write_column::<ByteArrayType, _>(g, &platforms, None, None)
            })
        };
        let read = read_parquet(file(&[b"EVENT_TYPE_PLAY", b"42"], &[b"PLATFORM_ROKU", b"-3"])).expect("read");
        let enums: Vec<(i32, i32)> = read.iter().map(|r| (r.event.r#type, r.event.platform)).collect();
        assert_eq!(enums, [(EventType::Play as i32, Platform::Roku as i32), (42, -3)]);

        for (bytes, column) in [
            (file(&[b"EVENT_TYPE_PLAY", b"PLAY"], &[b"1", b"1"]), "column type:"),
            (file(&[b"1", b"1"], &[b"1", b"roku"]), "column platform:"),
        ] {
            let error = read_parquet(bytes.clone()).expect_err("not an enum value").to_string();
            assert!(error.contains(column), "{error}");
            read_parquet_rows(bytes).expect_err("the record API refuses it too");
        }
    }

    #[test]
    fn invalid_utf8_and_mistyped_columns_are_errors_naming_the_column() {
        let not_utf8 = write_raw("message m { required binary user_id (STRING); }", |g| {
            write_column::<ByteArrayType, _>(g, &texts_of(&[b"ok", b"\xff\xfe"]), None, None)
        });
        let error = read_parquet(not_utf8.clone()).expect_err("not UTF-8").to_string();
        assert!(error.contains("column user_id:"), "{error}");
        read_parquet_rows(not_utf8).expect_err("the record API refuses it too");

        let key_not_utf8 = write_raw(
            "message m { required group attributes (MAP) { repeated group key_value {
                required binary key (STRING); required binary value (STRING); } } }",
            |g| {
                let reps = [0, 1, 0];
                write_column::<ByteArrayType, _>(g, &texts_of(&[b"a", b"\xc3"]), Some(&[1, 1, 0]), Some(&reps))?;
                write_column::<ByteArrayType, _>(g, &texts_of(&[b"1", b"2"]), Some(&[1, 1, 0]), Some(&reps))
            },
        );
        let error = read_parquet(key_not_utf8.clone()).expect_err("not UTF-8").to_string();
        assert!(error.contains("column attributes.key_value.key:"), "{error}");
        read_parquet_rows(key_not_utf8).expect_err("the record API refuses it too");

        for (schema, column) in [
            ("message m { required int32 event_id; }", "event_id"),
            ("message m { required int32 occurred_at_ms; }", "occurred_at_ms"),
            ("message m { required int32 geo_lat; }", "geo_lat"),
            ("message m { required int32 sub_sequence_number; }", "sub_sequence_number"),
        ] {
            let bytes = write_raw(schema, |g| write_column::<Int32Type, _>(g, &[1, 2], None, None));
            let error = read_parquet(bytes.clone()).expect_err("mistyped").to_string();
            assert!(error.contains(&format!("column {column}:")), "{error}");
            read_parquet_rows(bytes).expect_err("the record API refuses it too");
        }
        // Binary without a string annotation is bytes, not text.
        let bytes = write_raw("message m { required binary page; }", |g| {
            write_column::<ByteArrayType, _>(g, &texts_of(&[b"/home"]), None, None)
        });
        let error = read_parquet(bytes.clone()).expect_err("not a string").to_string();
        assert!(error.contains("column page:"), "{error}");
        read_parquet_rows(bytes).expect_err("the record API refuses it too");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Any events, in any row groups and pages, of the current schema or the one before
        /// `app_id`: the columnar reader reads what was written, as the record API does.
        #[test]
        fn the_columnar_reader_reads_as_the_record_api_does(
            mut records in proptest::collection::vec(arb_record(), 0..40),
            sizes in proptest::collection::vec(0usize..12, 0..4),
            rows_per_page in 1usize..9,
            older in any::<bool>(),
        ) {
            let schema = if older { schema_before_app_id() } else { PARQUET_SCHEMA.to_owned() };
            let groups = row_groups(&records, &sizes);
            let groups: Vec<&[&EventRecord]> = groups.iter().map(Vec::as_slice).collect();
            let bytes = Bytes::from(write_row_groups(&schema, small_pages(rows_per_page), &groups).expect("write"));
            let read = read_parquet(bytes.clone()).expect("read");
            prop_assert_eq!(&read, &read_parquet_rows(bytes).expect("rows"));
            if older {
                for record in &mut records {
                    record.event.app_id.clear();
                }
            }
            prop_assert_eq!(&read, &records);
        }
    }

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
