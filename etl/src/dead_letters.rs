//! A day's dead letters by reason: every dead-letters object of `<prefix>/dead-letters/dt=D/`,
//! each record once (by shard, sequence and sub-sequence number), counted by the class of its
//! reason (the reason up to its first `:`, digits replaced by `N`, so "the event_id is 300 bytes
//! long" and "... 301 ..." are one class), with one full reason per class as an example.

use std::collections::{BTreeMap, HashSet};

use ktk_pipeline::s3::{decode_dead_letters_object, is_dead_letters_object};

use crate::run::Etl;
use crate::{Day, EtlError};

/// One class of reasons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReasonCount {
    pub class: String,
    pub count: u64,
    /// The first full reason of the class.
    pub example: String,
    /// Shards it was seen in.
    pub shards: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadLetterReport {
    pub day: Option<Day>,
    pub objects: usize,
    pub bytes: u64,
    /// Distinct dead letters.
    pub dead_letters: u64,
    /// Further copies (the same record written again after a retry or a hand-off).
    pub duplicates: u64,
    /// Most frequent first, then by class.
    pub reasons: Vec<ReasonCount>,
}

/// The class of a reason.
pub fn reason_class(reason: &str) -> String {
    let head = reason.split(':').next().unwrap_or(reason).trim();
    let mut class = String::with_capacity(head.len());
    let mut in_number = false;
    for c in head.chars() {
        if c.is_ascii_digit() {
            if !in_number {
                class.push('N');
            }
            in_number = true;
        } else {
            in_number = false;
            class.push(c);
        }
    }
    class
}

/// Counts the dead letters of `day`.
pub async fn report(etl: &Etl, day: Day) -> Result<DeadLetterReport, EtlError> {
    let bucket = etl.store().bucket().to_owned();
    let objects = etl.store().list(&etl.layout().dead_letters_day(day)).await?;
    let mut report = DeadLetterReport { day: Some(day), ..DeadLetterReport::default() };
    let mut seen = HashSet::new();
    let mut classes: BTreeMap<String, ReasonCount> = BTreeMap::new();
    for object in objects.iter().filter(|o| is_dead_letters_object(&o.key)) {
        let Some((body, _)) = etl.store().get(&object.key, Some(&object.etag)).await? else { continue };
        report.objects += 1;
        report.bytes += body.len() as u64;
        let letters = decode_dead_letters_object(&bucket, &object.key, &body).map_err(|e| EtlError::Decode {
            bucket: bucket.clone(),
            key: object.key.clone(),
            message: e.to_string(),
        })?;
        for letter in letters {
            if !seen.insert((letter.shard_id.clone(), letter.sequence_number.clone(), letter.sub_sequence_number)) {
                report.duplicates += 1;
                continue;
            }
            report.dead_letters += 1;
            let class = reason_class(&letter.reason);
            let entry = classes.entry(class.clone()).or_insert_with(|| ReasonCount {
                class,
                count: 0,
                example: letter.reason.clone(),
                shards: Vec::new(),
            });
            entry.count += 1;
            if !entry.shards.contains(&letter.shard_id) {
                entry.shards.push(letter.shard_id.clone());
                entry.shards.sort();
            }
        }
    }
    report.reasons = classes.into_values().collect();
    report.reasons.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.class.cmp(&b.class)));
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_grouped_by_their_head_with_numbers_folded() {
        assert_eq!(
            reason_class("not an events.v1.Event in protobuf: failed to decode"),
            "not an events.vN.Event in protobuf"
        );
        assert_eq!(
            reason_class("the event_id is 300 bytes long; at most 128"),
            reason_class("the event_id is 4001 bytes long; at most 128")
        );
        assert_eq!(reason_class("the event has no event_id"), "the event has no event_id");
    }
}
