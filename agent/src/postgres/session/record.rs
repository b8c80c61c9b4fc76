//! Statement records: opened when a statement is judged, finished when its result is
//! complete, handed to the store in batches.

use super::*;

/// A finished statement record is handed to the store within this long, busy or idle
/// session alike (or sooner, in a batch of [`RECORD_BATCH`]); the store's group commit
/// (`LINGER` in `store`) adds at most 100 ms. The bound every protocol keeps (HTTP's
/// batches are `protocol::statements`; PostgreSQL keeps its own under the session's lock).
pub(super) const RECORD_FLUSH: Duration = crate::protocol::statements::FLUSH;

/// Finished records sent to the store together (the batch's room is taken at its first
/// record, not grown record by record).
pub(super) const RECORD_BATCH: usize = crate::protocol::statements::BATCH;

/// Cuts a recorded (already redacted: a cut card number could pass a detector whole)
/// text to at most `max` bytes and a ` …` mark.
pub(super) fn cut_recorded(recorded: &mut String, max: usize) {
    if recorded.len() > max {
        let mut cut = max;
        while !recorded.is_char_boundary(cut) {
            cut -= 1;
        }
        recorded.truncate(cut);
        recorded.push_str(" …");
    }
}

impl Pump<'_> {
    /// A statement's text as it is recorded: sensitive values redacted, long texts cut.
    pub(super) fn recorded_text(&self, text: &str) -> String {
        let mut recorded = self.redacted_text(text);
        cut_recorded(&mut recorded, MAX_RECORDED_TEXT);
        recorded
    }

    pub(super) fn new_record(&self, text: &str, decision: Decision, rule: Option<String>) -> u32 {
        self.new_record_recorded(self.recorded_text(text), decision, rule)
    }

    /// [`Pump::new_record`] for a text already passed through [`Pump::recorded_text`].
    pub(super) fn new_record_recorded(
        &self,
        recorded: String,
        decision: Decision,
        rule: Option<String>,
    ) -> u32 {
        let mut st = self.lock();
        st.next_seq += 1;
        let seq = st.next_seq;
        let bytes = recorded.len();
        st.records_bytes += bytes;
        st.records.insert(
            seq,
            InFlight {
                record: StatementRecord {
                    session: self.session.clone(),
                    seq,
                    at: Timestamp::now(),
                    text: recorded,
                    params: Vec::new(),
                    decision,
                    rule,
                    approved_by: None,
                    held_ms: 0,
                    duration_ms: None,
                    rows: None,
                    tag: None,
                    error: None,
                    masked: 0,
                },
                started: Instant::now(),
                bytes,
            },
        );
        seq
    }

    /// Takes a record out of those in flight.
    pub(super) fn take_record(st: &mut State, seq: u32) -> Option<InFlight> {
        let r = st.records.remove(&seq)?;
        st.records_bytes -= r.bytes;
        Some(r)
    }

    pub(super) fn update_record(&self, seq: u32, f: impl FnOnce(&mut StatementRecord)) {
        if let Some(r) = self.lock().records.get_mut(&seq) {
            f(&mut r.record);
        }
    }

    pub(super) fn finish_record(&self, seq: u32) {
        let mut st = self.lock();
        if let Some(mut r) = Self::take_record(&mut st, seq) {
            r.record.duration_ms =
                Some(r.started.elapsed().as_secs_f64() * 1000.0 - r.record.held_ms as f64);
            if st.finished.capacity() == 0 {
                st.finished.reserve_exact(RECORD_BATCH);
            }
            st.finished.push(r.record);
            if st.finished.len() == 1 {
                self.records_due.notify_one();
            }
        }
        if st.finished.len() >= RECORD_BATCH {
            let batch = std::mem::take(&mut st.finished);
            drop(st);
            self.submit(batch);
        }
    }

    pub(super) fn submit(&self, batch: Vec<StatementRecord>) {
        if batch.is_empty() {
            return;
        }
        self.ctx
            .store
            .record_statements(crate::protocol::statements::fitted(batch));
    }

    /// Sends the finished records to the store (those in flight stay).
    pub(super) fn flush_finished(&self) {
        let batch = std::mem::take(&mut self.lock().finished);
        self.submit(batch);
    }

    pub(super) fn flush_records(&self) {
        let mut st = self.lock();
        let mut batch = std::mem::take(&mut st.finished);
        st.records_bytes = 0;
        batch.extend(
            std::mem::take(&mut st.records)
                .into_values()
                .map(|r| r.record),
        );
        drop(st);
        self.submit(batch);
    }

    pub(super) fn with_record(&self, rec: u32, f: impl FnOnce(&mut StatementRecord)) {
        self.update_record(rec, f);
    }
}
