//! `session.*`: login (with `HOST_IS_SLAVE` on members and
//! `SESSION_AUTHENTICATION_FAILED`), logout, and the emergency local login.

use xenvault_types::Value;

use super::{Ctx, Impl, arg_str, void};
use crate::error::{ApiError, ApiResult};

/// The explicit `session` messages.
pub fn lookup(msg: &str) -> Option<Impl> {
    Some(match msg {
        "login_with_password" => login_with_password,
        "slave_local_login_with_password" => slave_local_login,
        "logout" | "local_logout" => logout,
        _ => return None,
    })
}

fn login_with_password(ctx: &Ctx<'_>, args: &[Value]) -> ApiResult<Value> {
    let (user, pw, originator) = (arg_str(args, 0), arg_str(args, 1), arg_str(args, 3));
    ctx.pool
        .login(&user, &pw, &originator, &ctx.site.host, ctx.site.tls)
        .map(Value::String)
}

fn slave_local_login(ctx: &Ctx<'_>, args: &[Value]) -> ApiResult<Value> {
    let (user, pw) = (arg_str(args, 0), arg_str(args, 1));
    if user != ctx.pool.config.user || pw != ctx.pool.config.password {
        return Err(ApiError::new(
            "SESSION_AUTHENTICATION_FAILED",
            [user.as_str(), "Authentication failure"],
        ));
    }
    Ok(Value::String(ctx.pool.new_session(
        &user,
        "",
        &ctx.site.host,
    )))
}

fn logout(ctx: &Ctx<'_>, _args: &[Value]) -> ApiResult<Value> {
    let _ = ctx.pool.db().destroy("session", &ctx.session);
    Ok(void())
}
