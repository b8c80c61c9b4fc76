//! `jitgate token issue|list|revoke`: bearer tokens of the console's HTTP API. The daemon
//! mints the secret; this prints it once and never stores it.

use std::{process::ExitCode, time::Duration};

use clap::Subcommand;

use super::{Cli, output, parse_duration};
use crate::{
    control::{
        api::Call,
        client::ClientError,
        tokens::{Issued, TokenSpec},
    },
    model::{ApiToken, Timestamp},
};

#[derive(Subcommand)]
pub enum TokenAction {
    /// Issue a token that acts as you (root: `--user USER` for someone else) at the
    /// console's HTTP API. The secret is printed once.
    Issue {
        /// A label for lists (e.g. ci-approver).
        #[arg(long)]
        name: Option<String>,
        /// How long it lives [default: 30d; at most 90d].
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
        /// Reads only: approving, denying and revoking are refused.
        #[arg(long)]
        read_only: bool,
        /// The unix user it acts as (root only; never root).
        #[arg(long, value_name = "USER")]
        user: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Your tokens (root: every token), without their secrets.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token: its next use is refused.
    Revoke { id: String },
}

fn state(t: &ApiToken) -> &'static str {
    if t.revoked_at.is_some() {
        "revoked"
    } else if Timestamp::now() >= t.expires_at {
        "expired"
    } else {
        "live"
    }
}

pub fn run(cli: &Cli, action: &TokenAction) -> Result<ExitCode, ClientError> {
    match action {
        TokenAction::Issue {
            name,
            ttl,
            read_only,
            user,
            json,
        } => {
            let issued: Issued = cli.client()?.call_as(&Call::TokenIssue(TokenSpec {
                name: name.clone(),
                ttl_secs: ttl.map(|t| t.as_secs()),
                read_only: *read_only,
                user: user.clone(),
            }))?;
            if *json {
                output::json(&issued);
            } else {
                let t = &issued.token;
                eprintln!(
                    "issued {} ({}) acting as {}{}, until {}; this secret is shown once:",
                    t.id,
                    t.name,
                    t.user,
                    if t.read_only { ", read-only" } else { "" },
                    output::when(t.expires_at)
                );
                println!("{}", issued.secret);
            }
            Ok(ExitCode::SUCCESS)
        }
        TokenAction::List { json } => {
            let tokens: Vec<ApiToken> = cli.client()?.call_as(&Call::TokenList)?;
            if *json {
                output::json(&tokens);
            } else if tokens.is_empty() {
                println!("no API tokens");
            } else {
                let rows: Vec<Vec<String>> = tokens
                    .iter()
                    .map(|t| {
                        vec![
                            t.id.clone(),
                            t.name.clone(),
                            t.user.clone(),
                            if t.read_only {
                                "read-only"
                            } else {
                                "read-write"
                            }
                            .into(),
                            state(t).into(),
                            output::when(t.expires_at),
                            t.issued_by.clone(),
                        ]
                    })
                    .collect();
                output::table(
                    &[
                        "id",
                        "name",
                        "user",
                        "rights",
                        "state",
                        "expires",
                        "issued by",
                    ],
                    &rows,
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        TokenAction::Revoke { id } => {
            let t: ApiToken = cli
                .client()?
                .call_as(&Call::TokenRevoke { id: id.clone() })?;
            println!("revoked {} ({}, acting as {})", t.id, t.name, t.user);
            Ok(ExitCode::SUCCESS)
        }
    }
}
