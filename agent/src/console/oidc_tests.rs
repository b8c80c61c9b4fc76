//! ID-token validation against hand-made keys and tokens: each check fails the token it is
//! about, and only that one.

use std::sync::atomic::{AtomicUsize, Ordering};

use jsonwebtoken::{EncodingKey, Header, jwk::JwkSet};
use serde_json::{Value, json};

use super::*;

const ISS: &str = "https://id.example.com";
const CLIENT: &str = "jitgate";
const NONCE: &str = "n-0123456789";

struct Key {
    kid: String,
    pkcs8: Vec<u8>,
    jwk: Value,
}

fn key(kid: &str) -> Key {
    let pair = rcgen::KeyPair::generate().expect("P-256 key");
    let raw = pair.public_key_raw();
    assert_eq!(raw.len(), 65, "uncompressed point");
    Key {
        kid: kid.into(),
        pkcs8: pair.serialize_der(),
        jwk: json!({
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
            "x": BASE64URL_NOPAD.encode(&raw[1..33]),
            "y": BASE64URL_NOPAD.encode(&raw[33..]),
        }),
    }
}

fn set(keys: &[&Key]) -> JwkSet {
    serde_json::from_value(
        json!({ "keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() }),
    )
    .expect("key set")
}

fn claims() -> Value {
    let now = now_secs();
    json!({
        "iss": ISS, "aud": CLIENT, "sub": "s-ann", "exp": now + 300, "iat": now,
        "nonce": NONCE, "email": "ann@example.com", "email_verified": true,
        "groups": ["dba", "ops"],
    })
}

fn sign(key: &Key, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(key.kid.clone());
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_ec_der(&key.pkcs8)).expect("sign")
}

fn expected() -> Expected<'static> {
    Expected {
        issuer: ISS,
        client_id: CLIENT,
        nonce: NONCE,
        identity_claim: "email",
        groups_claim: "groups",
        max_age: None,
        now: now_secs(),
    }
}

fn with(change: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Value {
    let mut c = claims();
    change(c.as_object_mut().expect("object"));
    c
}

#[test]
fn a_good_token_names_the_person_and_groups() {
    let k = key("k1");
    let who = verify_id_token(&sign(&k, &claims()), &set(&[&k]), &expected()).unwrap();
    assert_eq!(who.id, "ann@example.com");
    assert_eq!(who.subject, "s-ann");
    assert_eq!(who.groups, ["dba", "ops"]);
}

/// A step-up sign-in (`max_age` asked) needs a token showing a recent authentication; the
/// `acr` is kept only when it is a plain value.
#[test]
fn a_step_up_sign_in_needs_a_recent_auth_time() {
    let k = key("k1");
    let keys = set(&[&k]);
    let now = now_secs();
    let asked = Expected {
        max_age: Some(300),
        ..expected()
    };
    let check = |c: Value, e: &Expected<'_>| verify_id_token(&sign(&k, &c), &keys, e);
    let fresh = with(|c| {
        c.insert("auth_time".into(), json!(now - 20));
        c.insert("acr".into(), json!("urn:example:mfa"));
    });
    let who = check(fresh.clone(), &asked).unwrap();
    assert_eq!(who.auth_time, Some(now - 20));
    assert_eq!(who.acr.as_deref(), Some("urn:example:mfa"));
    assert_eq!(
        check(claims(), &asked),
        Err(TokenError::AuthTime(300)),
        "none"
    );
    let stale = with(|c| {
        c.insert("auth_time".into(), json!(now - 300 - LEEWAY_SECS - 5));
    });
    assert_eq!(check(stale.clone(), &asked), Err(TokenError::AuthTime(300)));
    let future = with(|c| {
        c.insert("auth_time".into(), json!(now + LEEWAY_SECS + 60));
    });
    assert_eq!(check(future, &asked), Err(TokenError::AuthTime(300)));
    let text = with(|c| {
        c.insert("auth_time".into(), json!(now.to_string()));
    });
    assert_eq!(check(text, &asked), Err(TokenError::AuthTime(300)));
    // Without a step-up, an old authentication is an ordinary sign-in (kept as it is).
    assert_eq!(
        check(stale, &expected()).unwrap().auth_time,
        Some(now - 300 - LEEWAY_SECS - 5)
    );
    let odd = with(|c| {
        c.insert("acr".into(), json!("mfa plus"));
    });
    assert_eq!(
        check(odd, &expected()).unwrap().acr,
        None,
        "not a plain value"
    );
    assert_eq!(check(claims(), &expected()).unwrap().acr, None);
}

#[test]
fn each_claim_is_checked() {
    let k = key("k1");
    let keys = set(&[&k]);
    let now = now_secs();
    let check = |c: Value| verify_id_token(&sign(&k, &c), &keys, &expected());
    assert_eq!(
        check(with(|c| {
            c.insert("exp".into(), json!(now - 3600));
            c.insert("iat".into(), json!(now - 4000));
        })),
        Err(TokenError::Expired)
    );
    assert_eq!(
        check(with(|c| {
            c.insert("aud".into(), json!("someone-else"));
        })),
        Err(TokenError::Audience)
    );
    // Several audiences: `azp` must be present and us.
    assert_eq!(
        check(with(|c| {
            c.insert("aud".into(), json!([CLIENT, "other"]));
        })),
        Err(TokenError::Audience)
    );
    assert!(
        check(with(|c| {
            c.insert("aud".into(), json!([CLIENT, "other"]));
            c.insert("azp".into(), json!(CLIENT));
        }))
        .is_ok()
    );
    assert_eq!(
        check(with(|c| {
            c.insert("azp".into(), json!("other"));
        })),
        Err(TokenError::Audience)
    );
    assert_eq!(
        check(with(|c| {
            c.insert("nonce".into(), json!("n-other"));
        })),
        Err(TokenError::Nonce)
    );
    assert_eq!(
        check(with(|c| {
            c.remove("nonce");
        })),
        Err(TokenError::Nonce)
    );
    assert!(matches!(
        check(with(|c| {
            c.insert("iss".into(), json!("https://evil.example"));
        })),
        Err(TokenError::Issuer(_))
    ));
    assert_eq!(
        check(with(|c| {
            c.insert("iat".into(), json!(now + 3600));
        })),
        Err(TokenError::IssuedAt)
    );
    assert_eq!(
        check(with(|c| {
            c.insert("iat".into(), json!(now - 3600));
        })),
        Err(TokenError::IssuedAt)
    );
    assert_eq!(
        check(with(|c| {
            c.remove("iat");
        })),
        Err(TokenError::IssuedAt)
    );
    assert_eq!(
        check(with(|c| {
            c.insert("email_verified".into(), json!(false));
        })),
        Err(TokenError::MissingClaim("email_verified".into()))
    );
    assert_eq!(
        check(with(|c| {
            c.remove("email");
        })),
        Err(TokenError::MissingClaim("email".into()))
    );
}

#[test]
fn forged_signatures_and_algorithms_are_refused() {
    let k = key("k1");
    let keys = set(&[&k]);
    // alg none, with and without a signature part.
    let header = BASE64URL_NOPAD.encode(br#"{"alg":"none","kid":"k1"}"#);
    let body = BASE64URL_NOPAD.encode(claims().to_string().as_bytes());
    for token in [format!("{header}.{body}."), format!("{header}.{body}")] {
        assert_eq!(
            verify_id_token(&token, &keys, &expected()),
            Err(TokenError::Algorithm("none".into()))
        );
    }
    // HS256 "signed" with the public key as the secret (algorithm confusion).
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some("k1".into());
    let hs = jsonwebtoken::encode(
        &h,
        &claims(),
        &EncodingKey::from_secret(k.jwk.to_string().as_bytes()),
    )
    .unwrap();
    assert_eq!(
        verify_id_token(&hs, &keys, &expected()),
        Err(TokenError::Algorithm("HS256".into()))
    );
    // Another key claiming the same kid.
    let mallory = Key {
        kid: "k1".into(),
        ..key("m")
    };
    assert_eq!(
        verify_id_token(&sign(&mallory, &claims()), &keys, &expected()),
        Err(TokenError::Signature)
    );
    // A good token with its claims changed after signing.
    let good = sign(&k, &claims());
    let mut parts: Vec<&str> = good.split('.').collect();
    let forged = BASE64URL_NOPAD.encode(
        with(|c| {
            c.insert("email".into(), json!("root@example.com"));
        })
        .to_string()
        .as_bytes(),
    );
    parts[1] = &forged;
    assert_eq!(
        verify_id_token(&parts.join("."), &keys, &expected()),
        Err(TokenError::Signature)
    );
    assert!(matches!(
        verify_id_token("garbage", &keys, &expected()),
        Err(TokenError::Malformed(_))
    ));
}

#[tokio::test]
async fn an_unknown_key_is_fetched_again_but_not_too_often() {
    let (old, new) = (key("k-old"), key("k-new"));
    let fetches = AtomicUsize::new(0);
    let served = std::sync::Mutex::new(set(&[&old]));
    let fetch = || -> BoxFuture<'static, Result<JwkSet, String>> {
        fetches.fetch_add(1, Ordering::SeqCst);
        let keys = served.lock().unwrap().clone();
        Box::pin(async move { Ok(keys) })
    };
    let cache = KeyCache::with_refetch_every(Duration::from_millis(200));
    cache
        .verify(&sign(&old, &claims()), &expected(), &fetch)
        .await
        .unwrap();
    assert_eq!(fetches.load(Ordering::SeqCst), 1);
    // The provider rotates its key.
    *served.lock().unwrap() = set(&[&new]);
    let rotated = sign(&new, &claims());
    // Moments after a fetch: refused without asking the provider again.
    assert!(matches!(
        cache.verify(&rotated, &expected(), &fetch).await,
        Err(SignInError::Token(TokenError::UnknownKey(_)))
    ));
    assert_eq!(fetches.load(Ordering::SeqCst), 1);
    tokio::time::sleep(Duration::from_millis(250)).await;
    let who = cache.verify(&rotated, &expected(), &fetch).await.unwrap();
    assert_eq!(who.id, "ann@example.com");
    assert_eq!(fetches.load(Ordering::SeqCst), 2);
    // A made-up kid right after: refused, no fetch (rate limit).
    let bogus = sign(
        &Key {
            kid: "made-up".into(),
            ..key("x")
        },
        &claims(),
    );
    assert!(cache.verify(&bogus, &expected(), &fetch).await.is_err());
    assert_eq!(fetches.load(Ordering::SeqCst), 2);
    // The old key is gone: its tokens no longer verify.
    assert!(
        cache
            .verify(&sign(&old, &claims()), &expected(), &fetch)
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_failed_discovery_is_not_retried_at_once() {
    // A "provider" that accepts and hangs up, counting connections.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            drop(stream);
        }
    });
    let config = OidcConfig {
        issuer: format!("http://{addr}"),
        client_id: CLIENT.into(),
        client_secret_file: "/unused".into(),
        redirect_url: "https://console.example/auth/callback".into(),
        scopes: vec!["openid".into()],
        identity_claim: "email".into(),
        groups_claim: "groups".into(),
        unix_accounts: Default::default(),
        ca_file: None,
    };
    let provider = Provider::new(
        config,
        "secret".into(),
        super::super::fetch::Fetcher::new(None).unwrap(),
    );
    let first = provider.begin(None).await.err().expect("no provider there");
    assert!(matches!(first, SignInError::Provider(_)), "{first}");
    assert!(!first.to_string().contains("secret"));
    let second = provider.begin(None).await.err().expect("still none");
    assert_eq!(first.to_string(), second.to_string());
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "asked once within the retry delay"
    );
}
