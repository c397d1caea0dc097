//! Hostile input for every decoder of kip-certs that takes network or file input: PEM
//! (certificates, keys, bundles, CSRs), DER (peer certificates, CSRs), device URIs, OT
//! certificate requests and the model-signing texts (signatures, key ids, public and private
//! keys). Arbitrary bytes plus structure-aware damage of valid input (bit flips, truncation,
//! insertion, PEM framing with garbage inside).
//!
//! Properties: no panic; a clear error; and where something is accepted, it is what a valid
//! input would have given (a mutated CSR that still decodes yields a certificate for the
//! CSR's own key and the requested identity, never another).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code fails loudly"
)]

use std::{
    sync::OnceLock,
    time::{Duration, SystemTime},
};

use kip_certs::{
    DeviceIdentity, DeviceKey, Intermediate, RootCa, TrustBundle, certs_from_pem, key_from_pem,
    ot::{self, OtCertSpec, OtKeySource, OtProfile},
    parse_device_uri, parse_peer_cert,
    signing::{KeyId, PublicKey, Signature, SigningKey},
    verify_for_recovery,
};
use proptest::prelude::*;
use uuid::Uuid;

const DAY: Duration = Duration::from_secs(86_400);

fn config(default_cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

struct Fixture {
    inter: Intermediate,
    device_csr_der: Vec<u8>,
    device_key_raw: Vec<u8>,
    rsa_csr_pem: String,
    cert_der: Vec<u8>,
    root_der: Vec<u8>,
    crls: Vec<rustls::pki_types::CertificateRevocationListDer<'static>>,
    signing_pem: String,
    public_pem: String,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let now = SystemTime::now();
        let root = RootCa::generate("hostile root", now, 10 * DAY).unwrap();
        let inter = root
            .issue_intermediate("hostile inter", now, 5 * DAY)
            .unwrap();
        let key = DeviceKey::generate().unwrap();
        let csr_pem = key.csr_pem("gw").unwrap();
        let device_csr_der = pem_body(&csr_pem);
        let device_key_raw = rcgen::KeyPair::from_pem(&key.to_pem())
            .unwrap()
            .public_key_raw()
            .to_vec();
        let issued = inter.sign_device_csr(&csr_pem, id(), now, DAY).unwrap();
        let cert_der = certs_from_pem(&issued.cert_pem, "leaf").unwrap()[0].to_vec();
        // An RSA CSR, from the key of a generated OPC UA certificate.
        let opcua = ot::issue(
            &inter,
            &OtCertSpec {
                profile: OtProfile::OpcUa {
                    application_uri: "urn:x".into(),
                },
                common_name: "x".into(),
                dns_names: vec![],
                ip_addresses: vec![],
                validity_days: 1,
            },
            OtKeySource::Generate,
            now,
        )
        .unwrap();
        let rsa = rcgen::KeyPair::from_pem_and_sign_algo(
            opcua.private_key.unwrap().pem(),
            &rcgen::PKCS_RSA_SHA256,
        )
        .unwrap();
        let rsa_csr_pem = rcgen::CertificateParams::default()
            .serialize_request(&rsa)
            .unwrap()
            .pem()
            .unwrap();
        let signing = SigningKey::generate().unwrap();
        let crls = vec![inter.crl(&[], now, DAY).unwrap()];
        // The undamaged chain recovers: the property below exercises the accepting path.
        let bundle = TrustBundle::new(vec![root.cert_der().clone()]).unwrap();
        let chain = vec![
            rustls::pki_types::CertificateDer::from(cert_der.clone()),
            inter.cert_der().clone(),
        ];
        verify_for_recovery(&bundle, crls.clone(), &chain, &csr_pem, DAY, now).unwrap();
        Fixture {
            inter,
            device_csr_der,
            device_key_raw,
            rsa_csr_pem,
            cert_der,
            root_der: root.cert_der().to_vec(),
            crls,
            signing_pem: signing.to_pem(),
            public_pem: signing.public_key().to_pem(),
        }
    })
}

fn id() -> DeviceIdentity {
    DeviceIdentity {
        org_id: Uuid::from_u128(1),
        device_id: Uuid::from_u128(2),
    }
}

/// The DER inside the first PEM block of `pem`.
fn pem_body(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject as _;
    let (_, der) =
        <(rustls::pki_types::pem::SectionKind, Vec<u8>)>::from_pem_slice(pem.as_bytes()).unwrap();
    der
}

/// Standard base64 with line breaks: a PEM body.
fn pem(label: &str, der: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for c in der.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            b64.push(if i <= c.len() {
                char::from(A[(n >> shift) as usize & 63])
            } else {
                '='
            });
        }
    }
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|l| std::str::from_utf8(l).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

/// Damage to a DER structure: flipped bits, truncation, inserted bytes.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    Set(usize, u8),
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    proptest::collection::vec(
        prop_oneof![
            (any::<usize>(), 1u8..=255).prop_map(|(p, b)| Mutation::Flip(p, b)),
            any::<usize>().prop_map(Mutation::Truncate),
            (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..8))
                .prop_map(|(p, b)| Mutation::Insert(p, b)),
            // Length bytes set to their extremes.
            (
                any::<usize>(),
                prop_oneof![Just(0u8), Just(0x7f), Just(0x80), Just(0x84), Just(0xff)]
            )
                .prop_map(|(p, b)| Mutation::Set(p, b)),
        ],
        1..4,
    )
}

fn mutate(mut der: Vec<u8>, ms: &[Mutation]) -> Vec<u8> {
    for m in ms {
        let n = der.len().max(1);
        match m {
            Mutation::Flip(p, b) => {
                if let Some(x) = der.get_mut(p % n) {
                    *x ^= b;
                }
            }
            Mutation::Truncate(p) => der.truncate(p % n),
            Mutation::Insert(p, bytes) => {
                let at = p % (der.len() + 1);
                der.splice(at..at, bytes.iter().copied());
            }
            Mutation::Set(p, b) => {
                if let Some(x) = der.get_mut(p % n) {
                    *x = *b;
                }
            }
        }
    }
    der
}

/// Text that looks like PEM more often than chance: labels, dashes, base64, garbage.
fn pemish() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..512)
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        (
            prop_oneof![
                Just("CERTIFICATE"),
                Just("CERTIFICATE REQUEST"),
                Just("PRIVATE KEY"),
                Just("EC PRIVATE KEY"),
                Just("PUBLIC KEY"),
                Just("X"),
            ],
            proptest::collection::vec(any::<u8>(), 0..600),
        )
            .prop_map(|(label, der)| pem(label, &der)),
        (any::<usize>(), any::<u8>()).prop_map(|(p, b)| {
            // A real certificate PEM with one character changed.
            let mut s = kip_certs::cert_to_pem(&fixture().cert_der.clone().into()).into_bytes();
            let n = s.len();
            s[p % n] = b;
            String::from_utf8_lossy(&s).into_owned()
        }),
    ]
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn pem_decoders_never_panic(text in pemish()) {
        let _ = certs_from_pem(&text, "x").map_err(|e| assert!(!e.to_string().is_empty()));
        let _ = TrustBundle::from_pem(&text);
        let _ = key_from_pem(&text);
        let _ = DeviceKey::from_pem(&text);
        let _ = Intermediate::from_pem(&text, &text);
        let _ = PublicKey::from_pem(&text);
        let _ = PublicKey::all_from_pem(&text);
        let _ = SigningKey::from_pem(&text);
        let _ = parse_device_uri(&text);
    }

    #[test]
    fn certificate_der_decoders_never_panic(ms in mutations()) {
        let f = fixture();
        let der = mutate(f.cert_der.clone(), &ms);
        let _ = parse_peer_cert(&der);
        let _ = f.inter.is_issuer_of(&der);
        let _ = TrustBundle::new(vec![der.clone().into()]).map(|b| b.root_store());
        // Recovery takes a presented chain and a CSR from an unauthenticated request; a
        // damaged chain must be refused (or, if the damage missed everything signed, name the
        // original device).
        let bundle = TrustBundle::new(vec![f.root_der.clone().into()]).unwrap();
        let chain = vec![der.into(), f.inter.cert_der().clone()];
        let csr = pem("CERTIFICATE REQUEST", &f.device_csr_der);
        if let Ok(peer) = verify_for_recovery(&bundle, f.crls.clone(), &chain, &csr, DAY, SystemTime::now()) {
            prop_assert_eq!(peer.identity, id());
        }
    }

    /// A damaged CSR is refused, or (when the damage missed everything signed) gives a
    /// certificate for the original key and the identity asked for.
    #[test]
    fn damaged_csrs_never_yield_a_certificate_for_another_key(ms in mutations()) {
        let f = fixture();
        let der = mutate(f.device_csr_der.clone(), &ms);
        let now = SystemTime::now();
        match f.inter.sign_device_csr(&pem("CERTIFICATE REQUEST", &der), id(), now, DAY) {
            Ok(issued) => {
                let leaf = &certs_from_pem(&issued.cert_pem, "leaf").unwrap()[0];
                prop_assert_eq!(parse_peer_cert(leaf).unwrap().identity, id());
                let (_, x) = x509_parser::parse_x509_certificate(leaf).unwrap();
                prop_assert_eq!(x.public_key().subject_public_key.data.as_ref(), &f.device_key_raw[..]);
            }
            Err(e) => prop_assert!(e.to_string().contains("certificate signing request"), "{e}"),
        }
    }

    #[test]
    fn arbitrary_csr_text_is_refused_as_a_csr_error(text in pemish()) {
        let now = SystemTime::now();
        let err = fixture().inter.sign_device_csr(&text, id(), now, DAY).unwrap_err();
        prop_assert!(err.to_string().contains("certificate signing request"), "{err}");
        let spec = OtCertSpec {
            profile: OtProfile::TlsClient,
            common_name: "plc".into(),
            dns_names: vec![],
            ip_addresses: vec![],
            validity_days: 1,
        };
        prop_assert!(ot::issue(&fixture().inter, &spec, OtKeySource::Csr(&text), now).is_err());
    }

    /// Whatever an operator types into an OT request: refused with a field name, or issued.
    #[test]
    fn ot_requests_are_issued_exactly_when_they_validate(
        cn in "\\PC{0,70}|[a-z]{1,8}\u{0}",
        dns in proptest::collection::vec("[a-z0-9*._-]{0,20}|\\PC{0,10}", 0..3),
        uri in "urn:[a-z:]{1,20}|[a-z]{0,6}:?\\PC{0,10}",
        days in prop_oneof![0u32..3, 820u32..830, any::<u32>()],
        profile in 0u8..3,
    ) {
        let profile = match profile {
            0 => OtProfile::TlsServer,
            1 => OtProfile::TlsClient,
            _ => OtProfile::OpcUa { application_uri: uri },
        };
        let opcua = matches!(profile, OtProfile::OpcUa { .. });
        let spec = OtCertSpec {
            profile,
            common_name: cn,
            dns_names: dns,
            ip_addresses: vec!["10.1.2.3".parse().unwrap()],
            validity_days: days,
        };
        let now = SystemTime::now();
        // OPC UA from a CSR: generating an RSA key per case would dominate the run.
        let key = if opcua {
            OtKeySource::Csr(&fixture().rsa_csr_pem)
        } else {
            OtKeySource::Generate
        };
        match (spec.validate(), ot::issue(&fixture().inter, &spec, key, now)) {
            (Ok(()), Ok(issued)) => {
                let (_, x) = x509_parser::parse_x509_certificate(&issued.cert_der).unwrap();
                prop_assert!(!x.is_ca());
            }
            (Err(v), Err(i)) => prop_assert_eq!(v.to_string(), i.to_string()),
            (v, i) => prop_assert!(false, "validate {:?} but issue {:?}", v, i.map(|_| ())),
        }
    }

    #[test]
    fn signature_texts_parse_strictly(s in "ed25519:[0-9a-f]{0,70}:[0-9a-fA-F]{0,130}|\\PC{0,200}") {
        if let Ok(sig) = s.parse::<Signature>() {
            prop_assert_eq!(sig.to_string(), s.as_str());
        }
        if let Ok(k) = s.parse::<KeyId>() {
            prop_assert_eq!(k.to_string(), s.as_str());
        }
    }

    #[test]
    fn damaged_signing_keys_never_panic(ms in mutations(), public in any::<bool>()) {
        let f = fixture();
        if public {
            let der = mutate(pem_body(&f.public_pem), &ms);
            let _ = PublicKey::from_spki_der(&der);
            let _ = PublicKey::from_pem(&pem("PUBLIC KEY", &der));
        } else {
            let der = mutate(pem_body(&f.signing_pem), &ms);
            let _ = SigningKey::from_pkcs8_der(&der);
            let _ = SigningKey::from_pem(&pem("PRIVATE KEY", &der));
        }
    }
}
