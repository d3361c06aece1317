//! `POST /internal/purge`: the control plane's signed order to drop this location's copies of
//! keys (isolate memory and Cache API).

use keyward_shared::internal::{PURGE_PATH, PurgeAck, PurgeRequest};
use worker::{Date, Request, Response, Result, RouteContext};

use crate::{REGION_VAR, lookup, signed};

pub(crate) async fn handle(mut req: Request, ctx: RouteContext<()>) -> Result<Response> {
    let now_ms = Date::now().as_millis();
    let (purge, nonce) = match signed::parse::<PurgeRequest>(&mut req, &ctx.env, PURGE_PATH, now_ms).await? {
        Ok(signed) => (signed.body, signed.nonce),
        Err(refusal) => return Ok(refusal),
    };
    let drop_copies = async {
        let mut purged = 0;
        for hash in &purge.hashes {
            purged += usize::from(lookup::purge(hash).await?);
        }
        Result::<usize>::Ok(purged)
    };
    let (first_use, purged) = futures::join!(signed::first_use(&nonce, now_ms), drop_copies);
    let purged = purged?;
    if !first_use? {
        return signed::replayed();
    }
    let region = ctx.env.var(REGION_VAR).map(|v| v.to_string()).unwrap_or_default();
    Response::from_json(&PurgeAck { region, purged })
}
