//! The adapter from the KCL-style worker to the delivery pipeline: a [`RecordProcessor`] per shard
//! that hands each read to a [`ShardPipeline`] and checkpoints in the lease table when the
//! pipeline says a batch is in every sink.
//!
//! The worker's side of [`Acknowledge`]: a failing sink is retried until it works or the lease
//! leaves this worker (lost, or handed off to another); a delivered batch is checkpointed at its
//! last user record. A batch being filled when the shard is handed off, the lease is lost or the
//! process stops is abandoned: its records come after the last checkpoint, so whoever reads the
//! shard next builds the same batch from them.

use std::time::{Duration, SystemTime};

use ktk_consumer::{
    Checkpointer, ConsumerRecord, InitializeInput, ProcessRecordsInput, ProcessorError, RecordProcessor,
};
use ktk_pipeline::{Acknowledge, BatchEnd, DeliveryError, Pipeline, ShardPipeline, SinkError, UserRecord};

/// Delivers one shard through the pipeline.
#[derive(Debug)]
pub struct DeliveryProcessor {
    shard: ShardPipeline,
}

impl DeliveryProcessor {
    /// The processor of `shard_id` of `stream` (as the worker's factory:
    /// `move |shard: &str| DeliveryProcessor::new(&pipeline, &stream, shard)`).
    pub fn new(pipeline: &Pipeline, stream: &str, shard_id: &str) -> Self {
        DeliveryProcessor { shard: pipeline.shard(stream, shard_id) }
    }
}

/// The worker's answers to the pipeline.
struct Checkpoints<'a> {
    checkpointer: &'a Checkpointer,
}

impl Acknowledge for Checkpoints<'_> {
    fn may_retry(&self, _attempt: u32, _error: &SinkError, _pause: Duration) -> Result<(), String> {
        if self.checkpointer.is_lease_lost() {
            Err("the lease was lost".to_owned())
        } else if self.checkpointer.is_handoff_requested() {
            Err("the lease is being handed off to another worker".to_owned())
        } else {
            Ok(())
        }
    }

    async fn batch_delivered(&mut self, end: &BatchEnd) -> Result<(), DeliveryError> {
        self.checkpointer
            .checkpoint_at(&end.sequence_number, end.sub_sequence_number)
            .await
            .map_err(|e| DeliveryError::Acknowledge(Box::new(e)))
    }
}

/// A read's record as the pipeline takes it.
pub fn user_record(record: ConsumerRecord) -> UserRecord {
    UserRecord {
        sequence_number: record.sequence_number,
        sub_sequence_number: record.sub_sequence_number,
        partition_key: record.partition_key.to_string(),
        data: record.data,
        arrival: record.approximate_arrival,
    }
}

impl RecordProcessor for DeliveryProcessor {
    async fn initialize(&mut self, _input: &InitializeInput) -> Result<(), ProcessorError> {
        // After a failure the shard is read again from the checkpoint: start the batch afresh.
        self.shard.abandon();
        Ok(())
    }

    async fn process_records(
        &mut self,
        input: ProcessRecordsInput,
        checkpointer: &Checkpointer,
    ) -> Result<(), ProcessorError> {
        let mut ack = Checkpoints { checkpointer };
        let records = input.records.into_iter().map(user_record).collect();
        self.shard.process(records, &mut ack).await?;
        if input.millis_behind_latest == Some(0) {
            self.shard.flush_if_window_closed(SystemTime::now(), &mut ack).await?;
        }
        Ok(())
    }

    async fn shard_ended(&mut self, checkpointer: &Checkpointer) -> Result<(), ProcessorError> {
        self.shard.flush(&mut Checkpoints { checkpointer }).await?;
        checkpointer.checkpoint().await?;
        Ok(())
    }

    async fn shutdown_requested(&mut self, _checkpointer: &Checkpointer) -> Result<(), ProcessorError> {
        self.shard.abandon();
        Ok(())
    }

    async fn lease_lost(&mut self) {
        self.shard.abandon();
    }
}
