//! Reading ids in cluster mode: derived from the stream sequence, so they are the same on every
//! node without any coordination beyond JetStream's own.
//!
//! One NATS message carries one run of readings (a device message's values, sharing identity).
//! Reading `k` of the message with stream sequence `s` has id `s << RUN_BITS | k`. Ids are strictly
//! increasing in stream order and never reused, so "the last id I saw" stays a complete resume
//! point on any node; unlike single-node mode they are not contiguous (a gap after each message).
//! A message with more than [`MAX_RUN`] readings is sent as several NATS messages.
//! docs/decisions/0017-cluster-on-jetstream.md weighs this against one message per reading.

/// Bits of an id that number the readings of one message.
pub const RUN_BITS: u32 = 8;
/// Most readings in one NATS message.
pub const MAX_RUN: usize = 1 << RUN_BITS;

/// Id of the first reading of the message with this stream sequence.
pub fn first_id(stream_seq: u64) -> u64 {
    stream_seq << RUN_BITS
}

/// The stream sequence of the message that holds this reading id.
pub fn stream_seq(reading_id: u64) -> u64 {
    reading_id >> RUN_BITS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_the_stream_and_leave_room_for_a_run() {
        assert_eq!(first_id(1), 256);
        assert_eq!(stream_seq(first_id(7) + 255), 7);
        assert!(first_id(8) > first_id(7) + MAX_RUN as u64 - 1);
        // 2^45 messages before ids leave the doubles a JSON client reads exactly.
        assert!(first_id(1 << 45) <= 1 << 53);
    }
}
