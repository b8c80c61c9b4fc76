//! `jitgate audit verify --fleet`: every host's audit chain in the shared store, one line per
//! host (ok / FAILED with the first bad record and why / unsigned); exit 9 if any failed or is unsigned.

use std::process::ExitCode;

use super::{EXIT_LOST, EXIT_TAMPERED, output};
use crate::{
    control::{
        api::Call,
        client::{Client, ClientError},
    },
    store::audit::fleet::{FleetReport, HostReport, HostStatus},
};

pub fn verify(mut client: Client, json: bool) -> Result<ExitCode, ClientError> {
    let report: FleetReport = client.call_as(&Call::AuditVerifyFleet)?;
    if json {
        output::json(&report);
    } else {
        print!("{}", render(&report));
    }
    let tampered = report
        .hosts
        .iter()
        .any(|h| matches!(h.status, HostStatus::Failed | HostStatus::Unsigned));
    Ok(ExitCode::from(if report.ok {
        0
    } else if tampered {
        EXIT_TAMPERED
    } else {
        EXIT_LOST
    }))
}

fn render(report: &FleetReport) -> String {
    let mut out = String::new();
    if report.hosts.is_empty() {
        out.push_str("no audit records in the shared store yet\n");
    }
    for h in &report.hosts {
        out.push_str(&line(h));
    }
    let failed = report
        .hosts
        .iter()
        .filter(|h| h.status == HostStatus::Failed)
        .count();
    let lost = report
        .hosts
        .iter()
        .filter(|h| h.status == HostStatus::Lost)
        .count();
    if lost > 0 {
        out.push_str(&format!(
            "RECORDS LOST: {lost} of {} hosts lost spooled records before they reached their chains (see each host above)\n",
            report.hosts.len()
        ));
    }
    out.push_str(&if failed > 0 {
        format!(
            "FLEET AUDIT LOG TAMPERED WITH: {failed} of {} hosts failed (verified from {})\n",
            report.hosts.len(),
            report.verifier
        )
    } else {
        format!(
            "{} hosts checked from {}: no tampering found\n",
            report.hosts.len(),
            report.verifier
        )
    });
    out
}

fn line(h: &HostReport) -> String {
    let key = h.key.as_deref().unwrap_or("-");
    let mut out = match h.status {
        HostStatus::Ok if h.unsigned > 0 => format!(
            "{}: ok, {} records, signed by key {key} ({} older unsigned records: checked by that host's own `audit verify` only)\n",
            h.host, h.records, h.unsigned
        ),
        HostStatus::Ok => format!(
            "{}: ok, {} records, signed by key {key}\n",
            h.host, h.records
        ),
        HostStatus::Unsigned => format!(
            "{}: unsigned, {} records (the host runs a jitgated that does not sign its records: only its own `audit verify` checks them)\n",
            h.host, h.records
        ),
        HostStatus::Lost => format!(
            "{}: RECORDS LOST, {} records, signed by key {key} (the chain verifies):\n",
            h.host, h.records
        ),
        HostStatus::Failed => format!(
            "{}: FAILED{}, {} records:\n",
            h.host,
            h.first_bad_seq
                .map(|s| format!(" at record {s}"))
                .unwrap_or_default(),
            h.records
        ),
    };
    for p in &h.problems {
        out.push_str(&format!("  - {p}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_host_is_named_with_its_record() {
        let report = FleetReport {
            ok: false,
            verifier: "b".into(),
            hosts: vec![
                HostReport {
                    host: "a".into(),
                    status: HostStatus::Failed,
                    records: 4,
                    unsigned: 0,
                    first_bad_seq: Some(3),
                    key: Some("abcd".into()),
                    problems: vec!["record 3 (x) does not match its signature".into()],
                },
                HostReport {
                    host: "b".into(),
                    status: HostStatus::Ok,
                    records: 2,
                    unsigned: 0,
                    first_bad_seq: None,
                    key: Some("ef01".into()),
                    problems: vec![],
                },
            ],
        };
        let text = render(&report);
        assert!(text.contains("a: FAILED at record 3, 4 records:"), "{text}");
        assert!(text.contains("b: ok, 2 records"), "{text}");
        assert!(text.contains("1 of 2 hosts failed"), "{text}");
    }
}
