//! The request context: what the module knows about a request between passes through the
//! access phase (the session, which provider decided, the provider call it waits for).
//!
//! Kept in the request pool (dropped by a pool cleanup) and found again after an internal
//! redirect, which clears `r->ctx`.

use core::ffi::c_void;
use core::mem::size_of;
use core::ptr;
use std::rc::Rc;

use authentik_core::session::SessionView;
use nginx_sys::{ngx_http_request_t, ngx_pool_cleanup_add, ngx_pool_cleanup_t};
use ngx::http::HttpModule;

use crate::call::CallHandle;
use crate::provider::Provider;
use crate::HttpAuthentikModule;

pub struct RequestCtx {
    /// The session, when the request is authenticated (variables read it); its bytes live in
    /// the request pool.
    pub session: Option<SessionView<'static>>,
    /// The provider whose access decision let the request through; later passes through a
    /// location of the same provider keep it, a location of another provider decides again.
    pub done_for: *const Provider,
    /// The provider call the request is suspended on (see `call`).
    pub call: *mut CallHandle,
    /// What header authentication answered for this request (`None` inside: refused), once the
    /// provider call is done.
    pub header_auth: Option<Option<SessionView<'static>>>,
    /// The provider `auth_authentik auto` chose for this request (a block's or an outpost's).
    pub chosen: *const Provider,
    /// Outpost providers this request used (the last is the current one): kept alive while
    /// the request lives, since headers borrow their names and a call may be in flight.
    pub held: Vec<Rc<Provider>>,
    /// Under `satisfy any`: the answer left for after the other access modules (`authorize`).
    pub deferred: Option<crate::authorize::Deferred>,
    /// The session cookie missed the zone and was looked up in the shared store (once).
    pub store_checked: bool,
}

impl Default for RequestCtx {
    fn default() -> Self {
        RequestCtx {
            session: None,
            done_for: ptr::null(),
            call: ptr::null_mut(),
            header_auth: None,
            chosen: ptr::null(),
            held: Vec::new(),
            deferred: None,
            store_checked: false,
        }
    }
}

/// The cleanup handler that marks a pool cleanup entry as this module's request context;
/// read through this static so that registration and lookup use the same address.
static DROP_CTX: unsafe extern "C" fn(*mut c_void) = drop_ctx;

unsafe extern "C" fn drop_ctx(data: *mut c_void) {
    // SAFETY: `data` is the RequestCtx written by `create`.
    unsafe { ptr::drop_in_place(data as *mut RequestCtx) };
}

/// The request's context, if one was created (also after an internal redirect).
pub fn get(r: &mut ngx_http_request_t) -> Option<&mut RequestCtx> {
    let index = HttpAuthentikModule::module().ctx_index;
    // SAFETY: r->ctx has one slot per http module.
    let slot = unsafe { &mut *r.ctx.add(index) };
    if !slot.is_null() {
        // SAFETY: only this module writes its slot, with a RequestCtx.
        return Some(unsafe { &mut *(*slot as *mut RequestCtx) });
    }
    // SAFETY: walks the request pool's cleanup list.
    let mut cln: *mut ngx_pool_cleanup_t = unsafe { (*r.pool).cleanup };
    while !cln.is_null() {
        // SAFETY: live cleanup entries of the pool.
        let c = unsafe { &*cln };
        if c.handler.is_some_and(|h| ptr::fn_addr_eq(h, DROP_CTX)) {
            *slot = c.data;
            // SAFETY: a RequestCtx written by `create`.
            return Some(unsafe { &mut *(c.data as *mut RequestCtx) });
        }
        cln = c.next;
    }
    None
}

/// The request's context, created on first use; `None` when memory ran out.
pub fn get_or_create(r: &mut ngx_http_request_t) -> Option<&mut RequestCtx> {
    if get(r).is_some() {
        return get(r);
    }
    // SAFETY: allocates the context with a cleanup that drops it with the request pool.
    unsafe {
        let cln = ngx_pool_cleanup_add(r.pool, size_of::<RequestCtx>());
        if cln.is_null() {
            return None;
        }
        ptr::write((*cln).data as *mut RequestCtx, RequestCtx::default());
        (*cln).handler = Some(DROP_CTX);
        let index = HttpAuthentikModule::module().ctx_index;
        *r.ctx.add(index) = (*cln).data;
        Some(&mut *((*cln).data as *mut RequestCtx))
    }
}

/// The outpost provider `provider` is, as this request holds it (a provider call keeps it alive
/// with this); `None` for a block provider.
pub fn held(r: &mut ngx_http_request_t, provider: &Provider) -> Option<Rc<Provider>> {
    let ctx = get(r)?;
    ctx.held.iter().find(|p| ptr::eq(Rc::as_ptr(p), provider)).cloned()
}
