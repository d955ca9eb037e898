//! [`Reader`]: a shard reader of either kind behind one type, so the worker (and `ktk tail`)
//! reads a shard the same way whether it polls or subscribes.

use crate::retrieval::{FanOutReader, ReadResult, RetrievalError, ShardReader};

/// A shard reader of either kind, so the worker can be told which one to use.
#[derive(Debug)]
pub enum Reader {
    /// `GetRecords` polling ([`ShardReader`]).
    Polling(ShardReader),
    /// Enhanced fan-out ([`FanOutReader`]).
    FanOut(FanOutReader),
}

impl Reader {
    /// The next records of the shard; see [`ShardReader::read`] and [`FanOutReader::read`].
    pub async fn read(&mut self) -> Result<ReadResult, RetrievalError> {
        match self {
            Reader::Polling(reader) => reader.read().await,
            Reader::FanOut(reader) => reader.read().await,
        }
    }

    /// Whether the shard has been read to its end.
    pub fn ended(&self) -> bool {
        match self {
            Reader::Polling(reader) => reader.ended(),
            Reader::FanOut(reader) => reader.ended(),
        }
    }

    pub fn shard_id(&self) -> &str {
        match self {
            Reader::Polling(reader) => reader.shard_id(),
            Reader::FanOut(reader) => reader.shard_id(),
        }
    }
}

impl From<ShardReader> for Reader {
    fn from(reader: ShardReader) -> Self {
        Reader::Polling(reader)
    }
}

impl From<FanOutReader> for Reader {
    fn from(reader: FanOutReader) -> Self {
        Reader::FanOut(reader)
    }
}
