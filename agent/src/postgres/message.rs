//! PostgreSQL message kinds by direction, named: the pumps dispatch on these instead of
//! raw tag bytes (the same byte means different messages each way: `D` is Describe from the
//! client and DataRow from the server).
//!
//! A [`super::wire::Frame`] keeps its tag and body as read, so a message the gate passes on
//! untouched is re-encoded for the cost of a copy.

/// A message from the client (frontend), by its tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frontend {
    Query,
    Parse,
    Bind,
    Describe,
    Execute,
    Close,
    Sync,
    Flush,
    CopyData,
    CopyDone,
    CopyFail,
    FunctionCall,
    Terminate,
    /// Any other tag (authentication responses do not occur mid-session).
    Other(u8),
}

impl Frontend {
    pub const fn of(tag: u8) -> Self {
        match tag {
            b'Q' => Self::Query,
            b'P' => Self::Parse,
            b'B' => Self::Bind,
            b'D' => Self::Describe,
            b'E' => Self::Execute,
            b'C' => Self::Close,
            b'S' => Self::Sync,
            b'H' => Self::Flush,
            b'd' => Self::CopyData,
            b'c' => Self::CopyDone,
            b'f' => Self::CopyFail,
            b'F' => Self::FunctionCall,
            b'X' => Self::Terminate,
            other => Self::Other(other),
        }
    }
}

/// A message from the server (backend), by its tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    ParseComplete,
    BindComplete,
    CloseComplete,
    ParameterDescription,
    RowDescription,
    NoData,
    DataRow,
    CommandComplete,
    EmptyQueryResponse,
    PortalSuspended,
    ErrorResponse,
    ReadyForQuery,
    NoticeResponse,
    NotificationResponse,
    ParameterStatus,
    CopyOutResponse,
    CopyInResponse,
    CopyBothResponse,
    CopyData,
    CopyDone,
    FunctionCallResponse,
    BackendKeyData,
    Authentication,
    NegotiateProtocolVersion,
    Other(u8),
}

impl Backend {
    pub const fn of(tag: u8) -> Self {
        match tag {
            b'1' => Self::ParseComplete,
            b'2' => Self::BindComplete,
            b'3' => Self::CloseComplete,
            b't' => Self::ParameterDescription,
            b'T' => Self::RowDescription,
            b'n' => Self::NoData,
            b'D' => Self::DataRow,
            b'C' => Self::CommandComplete,
            b'I' => Self::EmptyQueryResponse,
            b's' => Self::PortalSuspended,
            b'E' => Self::ErrorResponse,
            b'Z' => Self::ReadyForQuery,
            b'N' => Self::NoticeResponse,
            b'A' => Self::NotificationResponse,
            b'S' => Self::ParameterStatus,
            b'H' => Self::CopyOutResponse,
            b'G' => Self::CopyInResponse,
            b'W' => Self::CopyBothResponse,
            b'd' => Self::CopyData,
            b'c' => Self::CopyDone,
            b'V' => Self::FunctionCallResponse,
            b'K' => Self::BackendKeyData,
            b'R' => Self::Authentication,
            b'v' => Self::NegotiateProtocolVersion,
            other => Self::Other(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_named_tag_round_trips_to_one_kind() {
        // A tag maps to one kind each way, and distinct named kinds have distinct tags.
        let mut front = std::collections::HashSet::new();
        let mut back = std::collections::HashSet::new();
        for tag in 0..=u8::MAX {
            if !matches!(Frontend::of(tag), Frontend::Other(_)) {
                assert!(front.insert(format!("{:?}", Frontend::of(tag))));
            }
            if !matches!(Backend::of(tag), Backend::Other(_)) {
                assert!(back.insert(format!("{:?}", Backend::of(tag))));
            }
        }
        assert_eq!(front.len(), 13);
        assert_eq!(back.len(), 24);
        assert_eq!(Frontend::of(b'D'), Frontend::Describe);
        assert_eq!(Backend::of(b'D'), Backend::DataRow);
    }
}
