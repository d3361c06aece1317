//! `POST /internal/purge`: the control plane's signed order to replace this location's copies of
//! keys (isolate memory and Cache API) with the records it carries.
//!
//! The purge names the region it is for, under the signature, and its nonce is checked before
//! any copy is touched. Its records count as confirmed from the earlier of the time it was
//! signed and the time it arrived, never later, so a purge held back and delivered late buys no
//! extra trust. A region whose `PURGE_MODE` variable is `tag-only` behaves as Cloudflare's
//! purge-by-tag does in production: it only drops Cache API copies, `PURGE_TAG_DELAY_MS` after
//! acknowledging, and never touches isolate memory (nor the credit shares held there).

use keyward_shared::ErrorCode;
use keyward_shared::freshness;
use keyward_shared::identity::IdentityRecord;
use keyward_shared::internal::{PURGE_PATH, PurgeAck, PurgeRequest};
use keyward_shared::policy::ApiRecord;
use worker::{Context, Date, Delay, Request, Response, RouteContext, console_error};

use crate::error::{EdgeError, EdgeResult};
use crate::lookup::{self, PurgeMode};
use crate::side::{self, SideRecord};
use crate::{REGION_VAR, credits, ratelimit, signed};

pub(crate) async fn handle(mut req: Request, ctx: RouteContext<Context>) -> EdgeResult<Response> {
    let arrived_ms = Date::now().as_millis();
    let purge = signed::parse::<PurgeRequest>(&mut req, &ctx.env, PURGE_PATH, arrived_ms).await?;
    let region = ctx.env.var(REGION_VAR).map(|v| v.to_string()).unwrap_or_default();
    if purge.body.region != region {
        let message = format!("this purge is for region `{}`; this is `{region}`", purge.body.region);
        return Err(EdgeError::new(ErrorCode::WrongRegion, message));
    }
    let confirmed_at_ms = freshness::purge_confirmed_at(purge.signed_at_ms, arrived_ms);
    let mode = purge_mode(&ctx);
    let records = purge.body.records;
    let apis = purge.body.apis.iter().map(|text| ApiRecord::from_json(text).map(SideRecord::Api));
    let identities = purge.body.identities.iter().map(|t| IdentityRecord::from_json(t).map(SideRecord::Identity));
    let sides = apis.chain(identities).collect::<Result<Vec<_>, _>>();
    let sides = sides.map_err(|e| EdgeError::new(ErrorCode::BadRequest, e.to_string()))?;
    if mode == PurgeMode::TagOnly {
        let delay_ms = ctx.env.var("PURGE_TAG_DELAY_MS").ok().and_then(|v| v.to_string().parse().ok()).unwrap_or(0);
        ctx.data.wait_until(async move {
            Delay::from(std::time::Duration::from_millis(delay_ms)).await;
            for record in records {
                if let Err(e) = lookup::purge(record, confirmed_at_ms, mode).await {
                    console_error!("tag-only purge failed: {e}");
                }
            }
            for side in sides {
                if let Err(e) = side::purge(side, confirmed_at_ms, mode).await {
                    console_error!("tag-only purge of a side record failed: {e}");
                }
            }
        });
        return Ok(Response::from_json(&PurgeAck { region, purged: 0, applied_at_ms: arrived_ms })?);
    }
    // Memory takes the records before the first await of each purge; the shares of their
    // credits and rate limits are dropped with them (a purge carries a tightening change).
    let applied_at_ms = Date::now().as_millis();
    let identities = sides.iter().filter_map(|s| match s {
        SideRecord::Identity(identity) => Some(IdentityRecord::hash_of(&identity.id)),
        SideRecord::Api(_) => None,
    });
    for hash in records.iter().map(|r| r.hash).chain(identities).collect::<Vec<_>>() {
        credits::drop_shares(&hash);
        ratelimit::drop_shares(&hash);
    }
    let (replaced, sides) = futures::future::try_join(
        futures::future::try_join_all(records.into_iter().map(|r| lookup::purge(r, confirmed_at_ms, mode))),
        futures::future::try_join_all(sides.into_iter().map(|s| side::purge(s, confirmed_at_ms, mode))),
    )
    .await?;
    let purged = replaced.into_iter().chain(sides).filter(|had_copy| *had_copy).count();
    Ok(Response::from_json(&PurgeAck { region, purged, applied_at_ms })?)
}

fn purge_mode(ctx: &RouteContext<Context>) -> PurgeMode {
    match ctx.env.var("PURGE_MODE").map(|v| v.to_string()).as_deref() {
        Ok("tag-only") => PurgeMode::TagOnly,
        _ => PurgeMode::Record,
    }
}
