// Shared by the fuzz targets (included with `include!`).
use std::sync::OnceLock;

use countersign_core::mask::{MaskPolicy, MaskingConfig};
use countersign_core::policy::{ContentPolicy, RequestFacts, ResponseRules};
use countersign_core::wire::ApiKind;

const APIS: [ApiKind; 6] = [
    ApiKind::OpenaiChat,
    ApiKind::OpenaiCompletions,
    ApiKind::OpenaiResponses,
    ApiKind::OpenaiEmbeddings,
    ApiKind::AnthropicMessages,
    ApiKind::GeminiGenerateContent,
];

fn api(selector: u8) -> ApiKind {
    APIS[usize::from(selector) % APIS.len()]
}

/// Every built-in detector, a custom one, pseudonyms with restore.
#[allow(dead_code)]
fn policy() -> &'static MaskPolicy {
    static P: OnceLock<MaskPolicy> = OnceLock::new();
    P.get_or_init(|| {
        let cfg = MaskingConfig::from_json(
            br#"{"salt":"fuzz-salt-0123456789","custom_detectors":[{"name":"emp","regex":"EMP-(?P<value>[0-9]{4,8})"}],
                "profiles":{"default":{"detectors":{"*":"redact","email":"pseudonymize","ipv4":"monitor","emp":"pseudonymize"},
                "restore":true,"response_window_chars":128}}}"#,
        )
        .expect("fuzz masking config");
        cfg.default_profile().expect("default profile").clone()
    })
}

#[allow(dead_code)]
fn rules() -> ResponseRules {
    static R: OnceLock<ContentPolicy> = OnceLock::new();
    R.get_or_init(|| {
        ContentPolicy::from_json(br#"{"response_rules":[{"name":"stop","phrases":["stop now"]},{"name":"watch","regex":["w[a-z]+h"],"action":"monitor"}]}"#)
            .expect("fuzz policy")
    })
    .response_rules(&RequestFacts::default())
}
