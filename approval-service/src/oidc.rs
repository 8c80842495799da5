//! The OpenID Connect relying party: reviewers sign in with the company's
//! identity provider (authorization code flow with PKCE, state and nonce).
//!
//! The protocol is the `openidconnect` crate's: discovery (whose issuer must
//! equal the configured one), the authorization URL, the code exchange, and
//! the ID token's verification (signature against the provider's JWKS,
//! issuer, audience = our client id, expiry, nonce). Nothing here parses or
//! checks a JWT by hand. What this module adds:
//! - the provider's metadata and keys are cached, re-fetched after
//!   [`METADATA_TTL`], and at once when an ID token is signed with a key id
//!   the cached set lacks (the provider rotated its keys), at most every
//!   [`MIN_REFRESH`];
//! - the configured claims become the person: `name_claim` the reviewer's
//!   name, `groups_claim` their groups;
//! - [`RelyingParty::recheck`]: the refresh token grant that asks the
//!   provider again, after sign-in, whether the person is still who they
//!   were and in `required_group` (the HTTP layer calls it at most every
//!   `recheck_seconds` per session: `http::oidc::SessionChecks`).
//!
//! Where the state, nonce and PKCE verifier wait between the redirect and
//! the callback is the HTTP layer's business (`http::oidc`, in the database).

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use openidconnect::core::{
    CoreAuthDisplay, CoreAuthPrompt, CoreAuthenticationFlow, CoreErrorResponseType,
    CoreGenderClaim, CoreJsonWebKey, CoreJweContentEncryptionAlgorithm, CoreJwsSigningAlgorithm,
    CoreProviderMetadata, CoreRevocableToken, CoreRevocationErrorResponse,
    CoreTokenIntrospectionResponse, CoreTokenType,
};
use openidconnect::{
    AdditionalClaims, AuthorizationCode, ClaimsVerificationError, Client, ClientId, ClientSecret,
    CsrfToken, EmptyExtraTokenFields, EndpointMaybeSet, EndpointNotSet, EndpointSet, IdTokenClaims,
    IdTokenFields, IssuerUrl, Nonce, NonceVerifier, OAuth2TokenResponse, PkceCodeChallenge,
    PkceCodeVerifier, RedirectUrl, RefreshToken, Scope, SignatureVerificationError,
    StandardErrorResponse, StandardTokenResponse, TokenResponse,
};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::config::OidcConfig;

/// How long the provider's metadata and keys are used before re-fetching.
pub const METADATA_TTL: Duration = Duration::from_secs(3600);

/// Shortest time between two fetches forced by an unknown signing key, so
/// tokens with made-up key ids cannot make us hammer the provider.
pub const MIN_REFRESH: Duration = Duration::from_secs(5);

/// The claims of an ID token besides the standard ones (the groups claim,
/// or a custom name claim).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExtraClaims {
    #[serde(flatten)]
    claims: serde_json::Map<String, serde_json::Value>,
}

impl AdditionalClaims for ExtraClaims {}

type Claims = IdTokenClaims<ExtraClaims, CoreGenderClaim>;

type IdFields = IdTokenFields<
    ExtraClaims,
    EmptyExtraTokenFields,
    CoreGenderClaim,
    CoreJweContentEncryptionAlgorithm,
    CoreJwsSigningAlgorithm,
>;

type ProviderClient = Client<
    ExtraClaims,
    CoreAuthDisplay,
    CoreGenderClaim,
    CoreJweContentEncryptionAlgorithm,
    CoreJsonWebKey,
    CoreAuthPrompt,
    StandardErrorResponse<CoreErrorResponseType>,
    StandardTokenResponse<IdFields, CoreTokenType>,
    CoreTokenIntrospectionResponse,
    CoreRevocableToken,
    CoreRevocationErrorResponse,
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointMaybeSet,
    EndpointMaybeSet,
>;

/// Why a sign-in through the provider did not work.
#[derive(Debug)]
pub enum OidcError {
    /// The provider could not be reached or answered nonsense (discovery,
    /// keys, token endpoint).
    Provider(String),
    /// The provider's answer was refused: the code exchange failed or the
    /// ID token did not verify (signature, issuer, audience, expiry, nonce).
    Refused(String),
    /// The ID token lacks the configured name claim.
    NoName(String),
    /// The name is spelled like one of the service's own deciders.
    MachineName(String),
    /// The person lacks the group `required_group` names.
    NotInGroup(String),
    /// No `[[reviewers]]` entry names the person, and no `required_group`
    /// admits people by group: an account of the provider is no reviewer.
    NotAReviewer(String),
}

impl std::fmt::Display for OidcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OidcError::Provider(m) => write!(f, "identity provider unavailable: {m}"),
            OidcError::Refused(m) => write!(f, "sign-in refused: {m}"),
            OidcError::NoName(claim) if claim == "email" => f.write_str(
                "the ID token has no usable \"email\" claim (an address counts only with \
                 email_verified: true; set oidc.name_claim to a claim the person cannot \
                 choose, e.g. \"oid\" on Microsoft Entra ID or \"sub\", where the provider \
                 does not verify addresses)",
            ),
            OidcError::NoName(claim) => write!(f, "the ID token has no usable {claim:?} claim"),
            OidcError::MachineName(name) => write!(
                f,
                "the name {name:?} is spelled like the service's own deciders (standing approvals, assessors); a person cannot sign in under it"
            ),
            OidcError::NotInGroup(g) => write!(f, "not a member of the required group {g:?}"),
            OidcError::NotAReviewer(name) => write!(
                f,
                "{name:?} is no reviewer: no [[reviewers]] entry lists the name (in `name` or \
                 `sign_in_names`), and without oidc.required_group nobody else may review"
            ),
        }
    }
}

/// A sign-in sent to the provider: where to send the browser, and what the
/// callback will need (the state names it; nonce and verifier stay secret).
pub struct Started {
    /// The provider's authorization URL with all parameters.
    pub authorize_url: String,
    /// The `state` parameter.
    pub state: String,
    /// The nonce the ID token must carry.
    pub nonce: String,
    /// The PKCE code verifier.
    pub pkce_verifier: String,
}

/// A finished sign-in: the person, and the refresh token the provider
/// gave (if any) to ask for their groups again later.
pub struct SignedIn {
    /// Who signed in.
    pub person: Person,
    /// The refresh token; a secret: seal it before storing, never log it.
    pub refresh_token: Option<String>,
}

/// Accepts any nonce: an ID token from a refresh answers no sign-in of
/// ours, so there is no nonce to compare (signature, issuer, audience and
/// expiry are still checked).
#[derive(Clone, Copy)]
struct AnyNonce;

impl NonceVerifier for AnyNonce {
    fn verify(self, _nonce: Option<&Nonce>) -> Result<(), String> {
        Ok(())
    }
}

/// Who signed in, from the verified ID token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Person {
    /// The value of `name_claim`.
    pub name: String,
    /// The values of `groups_claim`.
    pub groups: Vec<String>,
}

/// The service's one HTTP client (`crate::outbound`) as the openidconnect
/// crate calls it, so the crate brings no HTTP client of its own.
struct ProviderHttp(reqwest::Client);

impl<'c> openidconnect::AsyncHttpClient<'c> for ProviderHttp {
    type Error = openidconnect::HttpClientError<reqwest::Error>;
    type Future =
        Pin<Box<dyn Future<Output = Result<openidconnect::HttpResponse, Self::Error>> + Send + 'c>>;

    fn call(&'c self, request: openidconnect::HttpRequest) -> Self::Future {
        Box::pin(async move {
            let request = reqwest::Request::try_from(request).map_err(Box::new)?;
            let response = self.0.execute(request).await.map_err(Box::new)?;
            let mut answer = openidconnect::http::Response::builder()
                .status(response.status())
                .version(response.version());
            for (name, value) in response.headers() {
                answer = answer.header(name, value);
            }
            let body = response.bytes().await.map_err(Box::new)?;
            answer
                .body(body.to_vec())
                .map_err(openidconnect::HttpClientError::Http)
        })
    }
}

struct Cached {
    metadata: CoreProviderMetadata,
    fetched: Instant,
}

/// The relying party: the configuration, the service's outbound HTTP
/// client (its CA file and proxy settings; it follows no redirects, the
/// crate's advice against SSRF), and the cached metadata.
pub struct RelyingParty {
    config: OidcConfig,
    http: ProviderHttp,
    cache: Mutex<Option<Cached>>,
}

impl RelyingParty {
    /// A relying party for `config` calling the provider with `http`;
    /// nothing is fetched yet (the provider may be down at start: token
    /// sign-in keeps working).
    pub fn new(config: OidcConfig, http: reqwest::Client) -> Result<RelyingParty, OidcError> {
        Ok(RelyingParty {
            config,
            http: ProviderHttp(http),
            cache: Mutex::new(None),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &OidcConfig {
        &self.config
    }

    /// The provider's metadata: cached, or fetched when older than
    /// [`METADATA_TTL`], or when `stale_keys` and older than [`MIN_REFRESH`].
    async fn metadata(&self, stale_keys: bool) -> Result<CoreProviderMetadata, OidcError> {
        let mut cache = self.cache.lock().await;
        if let Some(c) = cache.as_ref() {
            let age = c.fetched.elapsed();
            let fresh = if stale_keys {
                age < MIN_REFRESH
            } else {
                age < METADATA_TTL
            };
            if fresh {
                return Ok(c.metadata.clone());
            }
        }
        let issuer = IssuerUrl::new(self.config.issuer_url.clone())
            .map_err(|e| OidcError::Provider(format!("issuer URL: {e}")))?;
        let metadata = CoreProviderMetadata::discover_async(issuer, &self.http)
            .await
            .map_err(|e| OidcError::Provider(format!("discovery: {}", error_chain(&e))))?;
        *cache = Some(Cached {
            metadata: metadata.clone(),
            fetched: Instant::now(),
        });
        Ok(metadata)
    }

    fn client(&self, metadata: CoreProviderMetadata) -> Result<ProviderClient, OidcError> {
        let redirect = RedirectUrl::new(self.config.redirect_url.clone())
            .map_err(|e| OidcError::Provider(format!("redirect URL: {e}")))?;
        Ok(ProviderClient::from_provider_metadata(
            metadata,
            ClientId::new(self.config.client_id.clone()),
            self.config.client_secret.clone().map(ClientSecret::new),
        )
        .set_redirect_uri(redirect))
    }

    /// Starts a sign-in: fresh state, nonce and PKCE pair, and the URL.
    pub async fn start(&self) -> Result<Started, OidcError> {
        let client = self.client(self.metadata(false).await?)?;
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let mut request = client.authorize_url(
            CoreAuthenticationFlow::AuthorizationCode,
            CsrfToken::new_random,
            Nonce::new_random,
        );
        // The crate always asks for `openid`.
        for scope in self.config.scopes.iter().filter(|s| *s != "openid") {
            request = request.add_scope(Scope::new(scope.clone()));
        }
        let (url, state, nonce) = request.set_pkce_challenge(challenge).url();
        Ok(Started {
            authorize_url: url.to_string(),
            state: state.secret().clone(),
            nonce: nonce.secret().clone(),
            pkce_verifier: verifier.secret().clone(),
        })
    }

    /// Finishes a sign-in: exchanges `code` (with the PKCE verifier),
    /// verifies the ID token (with `nonce`), and reads the person from it.
    pub async fn finish(
        &self,
        code: String,
        nonce: &str,
        pkce_verifier: String,
    ) -> Result<SignedIn, OidcError> {
        let client = self.client(self.metadata(false).await?)?;
        let response = client
            .exchange_code(AuthorizationCode::new(code))
            .map_err(|e| OidcError::Provider(format!("token endpoint: {e}")))?
            .set_pkce_verifier(PkceCodeVerifier::new(pkce_verifier))
            .request_async(&self.http)
            .await
            .map_err(|e| OidcError::Refused(format!("code exchange: {}", error_chain(&e))))?;
        let id_token = response
            .id_token()
            .ok_or_else(|| OidcError::Refused("the token response has no ID token".into()))?;
        let claims = self
            .verified_claims(&client, id_token, &Nonce::new(nonce.to_string()))
            .await?;
        Ok(SignedIn {
            person: self.person(&claims_json(&claims)?)?,
            refresh_token: response.refresh_token().map(|t| t.secret().clone()),
        })
    }

    /// Asks the provider again who the holder of `refresh_token` is (the
    /// refresh token grant): the person, from the new ID token or, when
    /// the answer has none, the userinfo endpoint; and the refresh token
    /// to use next time (a new one when the provider rotates them).
    /// `Refused` when the provider no longer honours the token (the person
    /// was removed, their grant revoked), `NotInGroup` when they lost
    /// `required_group`, `Provider` when it could not be asked.
    pub async fn recheck(&self, refresh_token: String) -> Result<SignedIn, OidcError> {
        let client = self.client(self.metadata(false).await?)?;
        let presented = RefreshToken::new(refresh_token);
        let response = client
            .exchange_refresh_token(&presented)
            .map_err(|e| OidcError::Provider(format!("token endpoint: {e}")))?
            .request_async(&self.http)
            .await
            .map_err(|e| match e {
                openidconnect::RequestTokenError::ServerResponse(r) => {
                    OidcError::Refused(format!("refresh: {}", r.error()))
                }
                other => OidcError::Provider(format!("refresh: {}", error_chain(&other))),
            })?;
        let claims = match response.id_token() {
            Some(id_token) => {
                claims_json(&self.verified_claims(&client, id_token, AnyNonce).await?)?
            }
            None => {
                let info: openidconnect::UserInfoClaims<ExtraClaims, CoreGenderClaim> = client
                    .user_info(response.access_token().clone(), None)
                    .map_err(|e| OidcError::Provider(format!("userinfo endpoint: {e}")))?
                    .request_async(&self.http)
                    .await
                    .map_err(|e| OidcError::Refused(format!("userinfo: {}", error_chain(&e))))?;
                serde_json::to_value(&info)
                    .map_err(|e| OidcError::Provider(format!("userinfo: {e}")))?
            }
        };
        Ok(SignedIn {
            person: self.person(&claims)?,
            refresh_token: Some(
                response
                    .refresh_token()
                    .map_or_else(|| presented.secret().clone(), |t| t.secret().clone()),
            ),
        })
    }

    /// The claims of `id_token`, verified (signature, issuer, audience,
    /// expiry, `nonce`); keys re-fetched once when it is signed with a key
    /// id we have not seen (the provider may have rotated its keys).
    async fn verified_claims<N: NonceVerifier + Clone>(
        &self,
        client: &ProviderClient,
        id_token: &openidconnect::IdToken<
            ExtraClaims,
            CoreGenderClaim,
            CoreJweContentEncryptionAlgorithm,
            CoreJwsSigningAlgorithm,
        >,
        nonce: N,
    ) -> Result<Claims, OidcError> {
        let verifier = client.id_token_verifier();
        match id_token.claims(&verifier, nonce.clone()) {
            Ok(claims) => Ok(claims.clone()),
            Err(ClaimsVerificationError::SignatureVerification(
                SignatureVerificationError::NoMatchingKey,
            )) => {
                let fresh = self.client(self.metadata(true).await?)?;
                let verifier = fresh.id_token_verifier();
                Ok(id_token
                    .claims(&verifier, nonce)
                    .map_err(|e| OidcError::Refused(format!("ID token: {e}")))?
                    .clone())
            }
            Err(e) => Err(OidcError::Refused(format!("ID token: {e}"))),
        }
    }

    /// The person the verified `claims` (as JSON: an ID token's or the
    /// userinfo endpoint's) name.
    fn person(&self, claims: &serde_json::Value) -> Result<Person, OidcError> {
        let name = person_name(claims, &self.config.name_claim)?;
        let groups = claim_list(claims, &self.config.groups_claim);
        if let Some(required) = &self.config.required_group {
            if !groups.contains(required) {
                return Err(OidcError::NotInGroup(required.clone()));
            }
        }
        Ok(Person { name, groups })
    }
}

/// The reviewer's name in `claim` of the verified `claims`: present, not
/// blank, and not spelled like one of the service's own deciders (a
/// person's decisions would read as a standing approval's or an
/// assessor's).
fn person_name(claims: &serde_json::Value, claim: &str) -> Result<String, OidcError> {
    let name = claim_text(claims, claim)
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| OidcError::NoName(claim.to_string()))?;
    if crate::approvals::is_machine_decider_name(&name) {
        return Err(OidcError::MachineName(name));
    }
    Ok(name)
}

/// Verified claims as JSON, the one form both sources of claims read as.
fn claims_json(claims: &Claims) -> Result<serde_json::Value, OidcError> {
    serde_json::to_value(claims).map_err(|e| OidcError::Refused(format!("ID token claims: {e}")))
}

/// A string claim. An address names someone only when the provider says
/// it verified it (`email_verified: true`; some providers write `"true"`):
/// where it does not say (Microsoft Entra ID, a provider letting people
/// register or change their address), anyone could claim a reviewer's
/// address, take their name, and count as a second person in a quorum.
fn claim_text(claims: &serde_json::Value, name: &str) -> Option<String> {
    if name == "email" && !email_verified(claims) {
        return None;
    }
    claims.get(name)?.as_str().map(str::to_string)
}

/// Whether the claims say the address was verified.
fn email_verified(claims: &serde_json::Value) -> bool {
    match claims.get("email_verified") {
        Some(serde_json::Value::Bool(verified)) => *verified,
        Some(serde_json::Value::String(verified)) => verified == "true",
        _ => false,
    }
}

/// A list-of-strings claim (one string counts as a list of one; other
/// values are ignored).
fn claim_list(claims: &serde_json::Value, name: &str) -> Vec<String> {
    match claims.get(name) {
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_str())
            .map(str::to_string)
            .collect(),
        Some(serde_json::Value::String(one)) => vec![one.clone()],
        _ => Vec::new(),
    }
}

/// An error and its sources, for logs.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use serde_json::json;

    #[test]
    fn nobody_signs_in_under_a_name_of_the_services_own_deciders() {
        let named =
            |n: &str| person_name(&json!({ "preferred_username": n }), "preferred_username");
        assert_eq!(named(" alice ").unwrap(), "alice");
        assert!(matches!(
            named("standing:sa_1"),
            Err(OidcError::MachineName(_))
        ));
        assert!(matches!(
            named("ASSESSOR:guard"),
            Err(OidcError::MachineName(_))
        ));
        assert!(matches!(named("  "), Err(OidcError::NoName(_))));
    }

    #[test]
    fn an_address_names_someone_only_when_the_provider_verified_it() {
        let with = |verified: serde_json::Value| {
            let mut claims = json!({"email": "alice@example.com", "sub": "1"});
            if !verified.is_null() {
                claims["email_verified"] = verified;
            }
            claim_text(&claims, "email")
        };
        assert_eq!(with(json!(true)).as_deref(), Some("alice@example.com"));
        assert_eq!(with(json!("true")).as_deref(), Some("alice@example.com"));
        // Not verified, or not said (Entra ID): nobody.
        assert_eq!(with(json!(false)), None);
        assert_eq!(with(json!("false")), None);
        assert_eq!(with(serde_json::Value::Null), None);
        assert_eq!(with(json!(1)), None);
        // Other claims are the provider's to vouch for.
        let claims = json!({"preferred_username": "alice"});
        assert_eq!(
            claim_text(&claims, "preferred_username").as_deref(),
            Some("alice")
        );
        assert!(OidcError::NoName("email".into())
            .to_string()
            .contains("email_verified: true"));
    }
}
