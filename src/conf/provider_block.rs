//! `authentik_provider NAME { ... }`: the block's directives, parsed through a command table
//! the way nginx parses blocks (argument counts, duplicates, unknown names), then the provider
//! validated as a whole and built.

use core::ffi::{c_char, c_void};
use core::ptr;
use std::path::PathBuf;
use std::sync::Arc;

use authentik_core::config::{
    parse_cookie_domain, parse_http_url, BasicAuthAttributes, Mode, ProviderMeta, ProviderSettings,
    DEFAULT_SCOPES,
};
use authentik_core::cookie::session_cookie_name;
use authentik_core::oidc::login::LOGIN_TTL;
use authentik_core::paths::UnauthPaths;
use authentik_core::provider::ProviderRuntime;
use nginx_sys::{ngx_command_t, ngx_conf_parse, ngx_conf_t};
use url::Url;

use super::{arg_str, args, conf_guard, conf_path, main_conf, parse_time, ConfOrigin, CONF_OK};
use crate::call::CallState;
use crate::provider::Provider;

/// Collects the block's directives before the provider is validated as a whole.
#[derive(Default)]
struct ProviderBlock {
    issuer: Option<Url>,
    client_id: Option<String>,
    client_secret: Option<String>,
    external_host: Option<Url>,
    mode: Option<Mode>,
    cookie_domain: Option<String>,
    scopes: Option<Vec<String>>,
    unauth: Option<UnauthPaths>,
    session_zone: Option<String>,
    timeout_ms: Option<u64>,
    login_timeout: Option<i64>,
    ca_file: Option<PathBuf>,
    post_logout_redirect: Option<Url>,
    trusted_audiences: Option<Vec<String>>,
    max_pending_calls: Option<usize>,
    intercept_header_auth: Option<bool>,
    basic_auth_user_attribute: Option<String>,
    basic_auth_password_attribute: Option<String>,
    /// Directives seen so far (a second one is a duplicate).
    seen: Vec<&'static str>,
}

/// How many arguments a block directive takes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Args {
    One,
    OneOrMore,
}

/// Parses a directive's arguments into the block; `Err` is the message `nginx -t` shows.
type Set = fn(&ngx_conf_t, &mut ProviderBlock, &[String]) -> Result<(), String>;

/// One directive of the block: its name, argument count and parser.
struct BlockCommand {
    name: &'static str,
    args: Args,
    set: Set,
}

const fn cmd(name: &'static str, args: Args, set: Set) -> BlockCommand {
    BlockCommand { name, args, set }
}

/// The block's command table.
static COMMANDS: &[BlockCommand] = &[
    cmd("issuer", Args::One, |_, b, v| {
        b.issuer = Some(url("issuer", &v[0])?);
        Ok(())
    }),
    cmd("client_id", Args::One, |_, b, v| {
        b.client_id = Some(v[0].clone());
        Ok(())
    }),
    cmd("client_secret", Args::One, set_client_secret),
    cmd("client_secret_file", Args::One, set_client_secret_file),
    cmd("external_host", Args::One, |_, b, v| {
        b.external_host = Some(url("external_host", &v[0])?);
        Ok(())
    }),
    cmd("mode", Args::One, |_, b, v| {
        b.mode = Some(Mode::parse(&v[0]).map_err(|e| e.to_string())?);
        Ok(())
    }),
    cmd("cookie_domain", Args::One, |_, b, v| {
        b.cookie_domain = Some(parse_cookie_domain(&v[0]).map_err(|e| e.to_string())?);
        Ok(())
    }),
    cmd("scopes", Args::OneOrMore, |_, b, v| {
        b.scopes = Some(v.to_vec());
        Ok(())
    }),
    cmd("unauth_paths", Args::OneOrMore, |_, b, v| {
        b.unauth = Some(UnauthPaths::compile(v).map_err(|e| e.to_string())?);
        Ok(())
    }),
    cmd("session_zone", Args::One, |_, b, v| {
        b.session_zone = Some(v[0].clone());
        Ok(())
    }),
    cmd("timeout", Args::One, |_, b, v| {
        let ms = parse_time(&v[0], false).ok_or_else(|| format!("invalid timeout \"{}\"", v[0]))?;
        {
            b.timeout_ms = Some(ms as u64);
            Ok(())
        }
    }),
    cmd("login_timeout", Args::One, |_, b, v| {
        let s =
            parse_time(&v[0], true).ok_or_else(|| format!("invalid login_timeout \"{}\"", v[0]))?;
        {
            b.login_timeout = Some(s);
            Ok(())
        }
    }),
    cmd("ca_file", Args::One, |cf, b, v| {
        b.ca_file = Some(conf_path(cf, &v[0]));
        Ok(())
    }),
    cmd("post_logout_redirect", Args::One, |_, b, v| {
        b.post_logout_redirect = Some(url("post_logout_redirect", &v[0])?);
        Ok(())
    }),
    cmd("trusted_audiences", Args::OneOrMore, |_, b, v| {
        b.trusted_audiences = Some(v.to_vec());
        Ok(())
    }),
    cmd("max_pending_calls", Args::One, |_, b, v| match v[0].parse::<usize>() {
        Ok(n) if (1..=65536).contains(&n) => {
            b.max_pending_calls = Some(n);
            Ok(())
        }
        _ => Err(format!("invalid max_pending_calls \"{}\"", v[0])),
    }),
    cmd("intercept_header_auth", Args::One, |_, b, v| match v[0].as_str() {
        "on" => {
            b.intercept_header_auth = Some(true);
            Ok(())
        }
        "off" => {
            b.intercept_header_auth = Some(false);
            Ok(())
        }
        _ => Err(format!(
            "invalid value \"{}\" in \"intercept_header_auth\", it must be \"on\" or \"off\"",
            v[0]
        )),
    }),
    cmd("basic_auth_user_attribute", Args::One, |_, b, v| {
        b.basic_auth_user_attribute = Some(v[0].clone());
        Ok(())
    }),
    cmd("basic_auth_password_attribute", Args::One, |_, b, v| {
        b.basic_auth_password_attribute = Some(v[0].clone());
        Ok(())
    }),
];

fn url(name: &str, value: &str) -> Result<Url, String> {
    parse_http_url(value).map_err(|e| format!("{name}: {e}"))
}

fn set_client_secret(_: &ngx_conf_t, b: &mut ProviderBlock, v: &[String]) -> Result<(), String> {
    if b.client_secret.is_some() {
        return Err("\"client_secret\" directive is duplicate".to_string());
    }
    b.client_secret = Some(v[0].clone());
    Ok(())
}

fn set_client_secret_file(
    cf: &ngx_conf_t,
    b: &mut ProviderBlock,
    v: &[String],
) -> Result<(), String> {
    let path = conf_path(cf, &v[0]);
    let secret = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read client_secret_file \"{}\": {e}", path.display()))?;
    let secret = secret.trim_end_matches(['\r', '\n']);
    if secret.is_empty() {
        return Err(format!("client_secret_file \"{}\" is empty", path.display()));
    }
    set_client_secret(cf, b, &[secret.to_string()])
}

/// `cf->handler` for the directives inside `authentik_provider { }`.
unsafe extern "C" fn provider_directive(
    cf: *mut ngx_conf_t,
    _dummy: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    conf_guard(|| {
        // SAFETY: `conf` is the ProviderBlock installed by cmd_add_provider for this parse.
        let (cf, block) = unsafe { (&mut *cf, &mut *(conf as *mut ProviderBlock)) };
        let argv: Vec<String> = match args(cf).iter().map(arg_str).collect::<Result<Vec<_>, _>>() {
            Ok(v) => v.into_iter().map(str::to_string).collect(),
            Err(()) => return emerg!(cf, "invalid value"),
        };
        let (name, values) = (argv[0].as_str(), &argv[1..]);
        let Some(command) = COMMANDS.iter().find(|c| c.name == name) else {
            return emerg!(cf, "unknown directive \"{}\"", name);
        };
        let count_ok = match command.args {
            Args::One => values.len() == 1,
            Args::OneOrMore => !values.is_empty(),
        };
        if !count_ok {
            return emerg!(cf, "invalid number of arguments in \"{}\" directive", name);
        }
        if block.seen.contains(&command.name) {
            return emerg!(cf, "\"{}\" directive is duplicate", name);
        }
        block.seen.push(command.name);
        match (command.set)(cf, block, values) {
            Ok(()) => CONF_OK,
            Err(msg) => emerg!(cf, "{}", msg),
        }
    })
}

pub unsafe extern "C" fn cmd_add_provider(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    _conf: *mut c_void,
) -> *mut c_char {
    conf_guard(|| {
        // SAFETY: nginx passes a valid configuration context.
        let cf = unsafe { &mut *cf };
        let Ok(name) = arg_str(&args(cf)[1]).map(str::to_string) else {
            return emerg!(cf, "invalid provider name");
        };
        if name.is_empty() || name == "off" {
            return emerg!(cf, "invalid provider name \"{}\"", name);
        }
        if main_conf(cf).providers.iter().any(|p| p.settings().name == name) {
            return emerg!(cf, "duplicate authentik_provider \"{}\"", name);
        }
        let origin = ConfOrigin::of(cf);

        let mut block = ProviderBlock::default();
        let saved = (cf.handler, cf.handler_conf);
        cf.handler = Some(provider_directive);
        cf.handler_conf = ptr::addr_of_mut!(block) as *mut c_void;
        // SAFETY: parses the block's contents with our handler; state restored below.
        let rv = unsafe { ngx_conf_parse(cf, ptr::null_mut()) };
        (cf.handler, cf.handler_conf) = saved;
        if !rv.is_null() {
            return rv;
        }

        match build_provider(cf, name, block, origin) {
            Ok(provider) => {
                main_conf(cf).providers.push(Box::new(provider));
                CONF_OK
            }
            Err(rv) => rv,
        }
    })
}

fn build_provider(
    cf: &mut ngx_conf_t,
    name: String,
    block: ProviderBlock,
    origin: ConfOrigin,
) -> Result<Provider, *mut c_char> {
    let Some(issuer) = block.issuer else {
        return Err(emerg!(cf, "\"issuer\" is missing in authentik_provider \"{}\"", name));
    };
    let Some(client_id) = block.client_id else {
        return Err(emerg!(cf, "\"client_id\" is missing in authentik_provider \"{}\"", name));
    };
    let Some(client_secret) = block.client_secret else {
        return Err(emerg!(
            cf,
            "\"client_secret\" or \"client_secret_file\" is missing in authentik_provider \"{}\"",
            name
        ));
    };
    let unauth = block.unauth.unwrap_or_default();

    let settings = ProviderSettings {
        name: name.clone(),
        issuer,
        client_id,
        client_secret,
        external_host: block.external_host,
        mode: block.mode.unwrap_or_default(),
        cookie_domain: block.cookie_domain,
        scopes: block
            .scopes
            .unwrap_or_else(|| DEFAULT_SCOPES.iter().map(|s| s.to_string()).collect()),
        timeout_ms: block.timeout_ms.unwrap_or(10_000),
        ca_file: block.ca_file,
        post_logout_redirect: block.post_logout_redirect,
        trusted_audiences: block.trusted_audiences.unwrap_or_default(),
        meta: ProviderMeta::of_block(&name),
        backchannel_host: None,
        basic_auth: block.basic_auth_password_attribute.map(|password_attribute| {
            BasicAuthAttributes {
                user_attribute: block.basic_auth_user_attribute.unwrap_or_default(),
                password_attribute,
            }
        }),
    };
    if let Err(e) = settings.validate() {
        return Err(emerg!(cf, "authentik_provider \"{}\": {}", settings.name, e));
    }
    let base_path = settings.base_path().to_string();
    let key = provider_key(settings.issuer.as_str(), &settings.client_id);
    let cookie_name = session_cookie_name(&settings.client_id);
    let name = settings.name.clone();
    let runtime = ProviderRuntime::new(settings, unauth)
        .map_err(|e| emerg!(cf, "authentik_provider \"{}\": {}", name, e))?;
    let max_in_flight = block.max_pending_calls.unwrap_or(DEFAULT_MAX_PENDING_CALLS);
    let metrics = Arc::new(crate::metrics::ProviderMetrics::default());
    Ok(Provider {
        runtime: Arc::new(runtime.with_timer(metrics.clone())),
        metrics,
        cookie_name,
        login_timeout: block.login_timeout.unwrap_or(LOGIN_TTL),
        key,
        base_path,
        calls: CallState::new(max_in_flight),
        zone: ptr::null(),
        zone_name: block.session_zone,
        declared_at: origin.to_string(),
        outpost: None,
        intercept_header_auth: block.intercept_header_auth.unwrap_or(true),
    })
}

/// Default of `max_pending_calls`: half of nginx's default thread pool (32 threads), so one
/// stalled provider leaves threads for the others.
const DEFAULT_MAX_PENDING_CALLS: usize = 16;

/// FNV-1a of `issuer NUL client_id`, folded to 32 bits.
pub fn provider_key(issuer: &str, client_id: &str) -> u32 {
    let bytes = issuer.bytes().chain([0]).chain(client_id.bytes());
    let h =
        bytes.fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    (h ^ (h >> 32)) as u32
}
