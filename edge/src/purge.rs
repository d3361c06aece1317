//! `POST /internal/purge`: the control plane's signed order to replace this location's copies of
//! keys (isolate memory and Cache API) with the records it carries.

use keyward_shared::internal::{PURGE_PATH, PurgeAck, PurgeRequest};
use worker::{Date, Request, Response, Result, RouteContext};

use crate::{REGION_VAR, lookup, signed};

pub(crate) async fn handle(mut req: Request, ctx: RouteContext<()>) -> Result<Response> {
    let now_ms = Date::now().as_millis();
    let (purge, nonce) = match signed::parse::<PurgeRequest>(&mut req, &ctx.env, PURGE_PATH, now_ms).await? {
        Ok(signed) => (signed.body, signed.nonce),
        Err(refusal) => return Ok(refusal),
    };
    // Memory takes the records on this future's first poll, before any other await.
    let applied_at_ms = Date::now().as_millis();
    let replace_copies = async {
        let replaced =
            futures::future::try_join_all(purge.records.into_iter().map(|r| lookup::purge(r, now_ms))).await?;
        Result::<usize>::Ok(replaced.into_iter().filter(|had_copy| *had_copy).count())
    };
    let (first_use, purged) = futures::join!(signed::first_use(&nonce, now_ms), replace_copies);
    let purged = purged?;
    if !first_use? {
        return signed::replayed();
    }
    let region = ctx.env.var(REGION_VAR).map(|v| v.to_string()).unwrap_or_default();
    Response::from_json(&PurgeAck { region, purged, applied_at_ms })
}
