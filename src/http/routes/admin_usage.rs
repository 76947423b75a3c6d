//! The usage part of `/admin`: `GET /admin/api/usage`, `GET
//! /admin/api/errors`, and the status page's charts and tables (server
//! rendered: SVG and HTML, no JavaScript). Client tokens appear by their
//! label (`label=token` in `GB_AUTH_TOKENS`), else by their id; never as
//! tokens.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Map, Value};

use super::admin_access::{check, esc};
use crate::domain::gateway::Gateway;
use crate::domain::usage::{hour_ms, By, Cell, Counts, ErrorEntry, HOUR_MS};
use crate::http::error::ApiError;
use crate::state::now_ms;

const DAY_MS: u64 = 24 * HOUR_MS;

/// The instant of a Unix time in ms; past the calendar's end, its end.
fn instant(ms: u64) -> jiff::Timestamp {
    i64::try_from(ms)
        .ok()
        .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
        .unwrap_or(jiff::Timestamp::MAX)
}

/// `2026-11-29T06:00Z` for a Unix time in ms (UTC).
pub fn iso_hour(ms: u64) -> String {
    instant(ms).strftime("%Y-%m-%dT%H:00Z").to_string()
}

fn iso_date(ms: u64) -> String {
    instant(ms).strftime("%Y-%m-%d").to_string()
}

/// A time bound: Unix seconds or ms, `YYYY-MM-DD`, `YYYY-MM-DDTHH:MM[:SS]`
/// (UTC), or an RFC 3339 instant with its offset. `end`: a bare date means
/// the end of that day.
pub(super) fn parse_time(raw: &str, end: bool) -> Option<u64> {
    let raw = raw.trim();
    // An instant with its offset (`Z`, `+02:00`) means that instant. A `+`
    // left unencoded in a query string arrives as a space.
    let with_offset = match raw.rsplit_once(' ') {
        Some((at, off))
            if at.contains(['T', 't']) && off.len() == 5 && off.as_bytes()[2] == b':' =>
        {
            std::borrow::Cow::Owned(format!("{at}+{off}"))
        }
        _ => std::borrow::Cow::Borrowed(raw),
    };
    if let Ok(at) = with_offset.parse::<jiff::Timestamp>() {
        return u64::try_from(at.as_millisecond()).ok();
    }
    let raw = raw.trim_end_matches('Z');
    if let Ok(n) = raw.parse::<u64>() {
        return Some(if n < 100_000_000_000 { n * 1000 } else { n });
    }
    let utc_ms = |at: jiff::civil::DateTime| {
        let ms = at
            .to_zoned_datetime(jiff::tz::TimeZone::UTC)
            .ok()?
            .timestamp()
            .as_millisecond();
        u64::try_from(ms).ok()
    };
    if !raw.contains(['T', 't', ' ']) {
        let date = raw.parse::<jiff::civil::Date>().ok()?;
        if !(1970..=9999).contains(&date.year()) {
            return None;
        }
        let start = utc_ms(date.to_datetime(jiff::civil::Time::midnight()))?;
        return Some(if end { start + DAY_MS - 1 } else { start });
    }
    let at = raw.parse::<jiff::civil::DateTime>().ok()?;
    if at.year() < 1970 {
        return None;
    }
    utc_ms(at)
}

struct Range {
    from: u64,
    to: u64,
    by: Vec<By>,
}

/// A parameter's decoded value, when it is there and not empty.
fn query_value(query: &str, name: &str) -> Option<String> {
    crate::upstream::client::query_param(query, name).filter(|v| !v.is_empty())
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, msg)
}

/// `from`, `to` (default: the last 24 h) and `by` (default `model`; several
/// may be joined with commas) of a query string.
fn range(query: &str, now: u64) -> Result<Range, ApiError> {
    let to = match query_value(query, "to") {
        Some(v) => parse_time(&v, true).ok_or_else(|| {
            bad("`to` must be a date (YYYY-MM-DD), a UTC time (YYYY-MM-DDTHH:MM), a time with its offset or Unix seconds.")
        })?,
        None => now,
    };
    let from = match query_value(query, "from") {
        Some(v) => parse_time(&v, false).ok_or_else(|| {
            bad("`from` must be a date (YYYY-MM-DD), a UTC time (YYYY-MM-DDTHH:MM), a time with its offset or Unix seconds.")
        })?,
        None => to.saturating_sub(DAY_MS - 1),
    };
    if from > to {
        return Err(bad("`from` must not be after `to`."));
    }
    let by = match query_value(query, "by") {
        None => vec![By::Model],
        Some(v) => v
            .split(',')
            .map(|b| {
                By::parse(b.trim()).ok_or_else(|| {
                    bad("`by` must be model, key, token or hour (or several, comma-separated).")
                })
            })
            .collect::<Result<Vec<_>, _>>()?,
    };
    Ok(Range { from, to, by })
}

fn label_of(gw: &Gateway, token_id: &str) -> String {
    gw.auth
        .label_of(token_id)
        .unwrap_or_else(|| token_id.to_string())
}

fn cell_json(row: &mut Map<String, Value>, cell: &Cell) {
    row.insert("requests".into(), json!(cell.requests));
    row.insert("errors".into(), json!(cell.errors));
    row.insert("errors_by_outcome".into(), json!(cell.errors_by_outcome));
    row.insert("prompt_tokens".into(), json!(cell.tokens.prompt));
    row.insert("output_tokens".into(), json!(cell.tokens.output));
    row.insert("thoughts_tokens".into(), json!(cell.tokens.thoughts));
    row.insert("cached_tokens".into(), json!(cell.tokens.cached));
    row.insert("total_tokens".into(), json!(cell.tokens.total));
}

async fn read(gw: &Gateway, from: u64, to: u64) -> Result<Counts, ApiError> {
    gw.usage
        .read(gw.store(), from, to, now_ms())
        .await
        .map_err(crate::http::pipeline::store_down)
}

pub async fn api_usage(gw: web::Data<Gateway>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    check(&gw, &req).await?;
    let r = range(req.query_string(), now_ms())?;
    let counts = read(&gw, r.from, r.to).await?;
    let rows: Vec<Value> = counts
        .group(&r.by)
        .into_iter()
        .map(|(keys, cell)| {
            let mut row = Map::new();
            for (b, k) in r.by.iter().zip(&keys) {
                match b {
                    By::Model => row.insert("model".into(), json!(k)),
                    By::Key => row.insert("key_id".into(), json!(k)),
                    By::Token => {
                        row.insert("label".into(), json!(label_of(&gw, k)));
                        row.insert("token_id".into(), json!(k))
                    }
                    By::Hour => row.insert("hour".into(), json!(iso_hour(hour_ms(k)))),
                };
            }
            cell_json(&mut row, &cell);
            Value::Object(row)
        })
        .collect();
    let mut totals = Map::new();
    cell_json(&mut totals, &counts.total());
    Ok(HttpResponse::Ok().json(json!({
        "from": iso_hour(counts.from_hour * HOUR_MS),
        "to": iso_hour(counts.to_hour * HOUR_MS),
        "rows": rows,
        "totals": totals,
        "overflow_series": counts.overflow,
        "retention_days": gw.settings.usage.retention_days,
    })))
}

pub async fn api_errors(
    gw: web::Data<Gateway>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    check(&gw, &req).await?;
    let errors = gw
        .usage
        .recent_errors(gw.store())
        .await
        .map_err(crate::http::pipeline::store_down)?;
    let rows: Vec<Value> = errors
        .iter()
        .map(|e| {
            json!({
                "time": iso_minute(e.time_ms),
                "time_ms": e.time_ms,
                "key_id": e.key_id,
                "model": e.model,
                "route": e.route,
                "status": e.status,
                "google_status": e.google_status,
                "reason": e.reason,
                "retry_delay_s": e.retry_delay_s,
            })
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({ "errors": rows })))
}

pub(super) fn iso_minute(ms: u64) -> String {
    instant(ms).strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

const COLORS: [&str; 8] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f",
];

/// A stacked bar chart of one value per hour and model.
#[allow(
    clippy::many_single_char_names,
    reason = "w, h, x, y: the chart's geometry, as SVG names it"
)]
fn chart(
    id: &str,
    title: &str,
    hours: &[u64],
    models: &[String],
    value: &dyn Fn(u64, &str) -> u64,
) -> String {
    let (w, h, left, bottom) = (720.0_f64, 200.0_f64, 50.0_f64, 20.0_f64);
    let max = hours
        .iter()
        .map(|&hr| models.iter().map(|m| value(hr, m)).sum::<u64>())
        .max()
        .unwrap_or(0)
        .max(1);
    let bar = (w - left) / hours.len().max(1) as f64;
    let mut svg = String::new();
    let _ = write!(
        svg,
        "<h3>{}</h3><svg id=\"{id}\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{}\" \
         role=\"img\" aria-label=\"{}\"><text x=\"2\" y=\"12\" font-size=\"11\">{max}</text>\
         <text x=\"2\" y=\"{}\" font-size=\"11\">0</text>",
        esc(title),
        h + bottom,
        esc(title),
        h
    );
    for (i, &hr) in hours.iter().enumerate() {
        let x = left + i as f64 * bar;
        let mut y = h;
        for (mi, m) in models.iter().enumerate() {
            let v = value(hr, m);
            if v == 0 {
                continue;
            }
            let bh = v as f64 / max as f64 * (h - 15.0);
            y -= bh;
            let _ = write!(
                svg,
                "<rect class=\"bar\" x=\"{x:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"{}\"><title>{} {}: {v}</title></rect>",
                (bar - 2.0).max(1.0),
                COLORS[mi % COLORS.len()],
                iso_hour(hr * HOUR_MS),
                esc(m)
            );
        }
        if i % 6 == 0 {
            let _ = write!(
                svg,
                "<text x=\"{x:.1}\" y=\"{}\" font-size=\"11\">{}</text>",
                h + 15.0,
                &iso_hour(hr * HOUR_MS)[11..16]
            );
        }
    }
    svg.push_str("</svg><p class=\"legend\">");
    for (mi, m) in models.iter().enumerate() {
        let _ = write!(
            svg,
            "<span><b style=\"color:{}\">■</b> {}</span>",
            COLORS[mi % COLORS.len()],
            esc(m)
        );
    }
    svg.push_str("</p>");
    svg
}

fn cells_row(cell: &Cell) -> String {
    format!(
        "<td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
         <td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>",
        cell.requests,
        cell.errors,
        cell.tokens.prompt,
        cell.tokens.output,
        cell.tokens.thoughts,
        cell.tokens.cached,
        cell.tokens.total
    )
}

const CELL_HEADS: &str = "<th>requests</th><th>errors</th><th>prompt</th><th>output</th>\
<th>thoughts</th><th>cached</th><th>total tokens</th>";

/// The page's usage section; `query` may carry `from` and `to`.
pub async fn section(gw: &Gateway, query: &str) -> String {
    let now = now_ms();
    let mut out = String::from("<h2>Usage</h2>");
    // The last 24 h, by hour and model.
    let day = gw
        .usage
        .read(gw.store(), now.saturating_sub(DAY_MS - HOUR_MS), now, now)
        .await
        .unwrap_or_default();
    let hours: Vec<u64> = (now / HOUR_MS - 23..=now / HOUR_MS).collect();
    let grouped: BTreeMap<(u64, String), Cell> = day
        .group(&[By::Hour, By::Model])
        .into_iter()
        .map(|(k, c)| ((hour_ms(&k[0]) / HOUR_MS, k[1].clone()), c))
        .collect();
    let models: Vec<String> = grouped
        .keys()
        .map(|(_, m)| m.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let get = |hr: u64, m: &str| grouped.get(&(hr, m.to_string()));
    out.push_str(&chart(
        "chart-requests",
        "Requests per hour, last 24 h, by model",
        &hours,
        &models,
        &|hr, m| get(hr, m).map_or(0, |c| c.requests),
    ));
    out.push_str(&chart(
        "chart-tokens",
        "Tokens per hour, last 24 h, by model",
        &hours,
        &models,
        &|hr, m| get(hr, m).map_or(0, |c| c.tokens.total),
    ));

    // Today (UTC) per key and model, against the whole pool.
    let today = gw
        .usage
        .read(gw.store(), now - now % DAY_MS, now, now)
        .await
        .unwrap_or_default();
    let pool = today.total();
    let _ = write!(
        out,
        "<h3>Today ({} UTC) per key and model</h3><table id=\"usage-keys\"><tr><th>key</th><th>model</th>\
         {CELL_HEADS}<th>share of pool tokens</th></tr>",
        iso_date(now)
    );
    for (k, cell) in today.group(&[By::Key, By::Model]) {
        let share = if pool.tokens.total > 0 {
            cell.tokens.total as f64 * 100.0 / pool.tokens.total as f64
        } else {
            0.0
        };
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td>{}<td class=\"n\">{share:.1}%</td></tr>",
            esc(&k[0]),
            esc(&k[1]),
            cells_row(&cell)
        );
    }
    let _ = write!(
        out,
        "<tr id=\"usage-pool\"><th>pool</th><th>all</th>{}<td class=\"n\">100%</td></tr></table>",
        cells_row(&pool)
    );

    // The chosen range per client token and per model.
    let r = range(query, now).unwrap_or(Range {
        from: now.saturating_sub(DAY_MS - 1),
        to: now,
        by: vec![By::Model],
    });
    let chosen = gw
        .usage
        .read(gw.store(), r.from, r.to, now)
        .await
        .unwrap_or_default();
    let _ = write!(
        out,
        "<h3>Usage from {} to {} (UTC)</h3>\
         <form method=\"get\" action=\"/admin\" id=\"range\"><label>From <input type=\"date\" name=\"from\" value=\"{}\"></label> \
         <label>To <input type=\"date\" name=\"to\" value=\"{}\"></label> <button type=\"submit\">Show</button></form>\
         <h4>Per client token</h4><table id=\"usage-tokens\"><tr><th>client token</th>{CELL_HEADS}</tr>",
        iso_hour(chosen.from_hour * HOUR_MS),
        iso_hour(chosen.to_hour * HOUR_MS + HOUR_MS - 1),
        iso_date(r.from),
        iso_date(r.to)
    );
    for (k, cell) in chosen.group(&[By::Token]) {
        let _ = write!(
            out,
            "<tr><td>{}</td>{}</tr>",
            esc(&label_of(gw, &k[0])),
            cells_row(&cell)
        );
    }
    let _ = write!(
        out,
        "</table><h4>Per model</h4><table id=\"usage-models\"><tr><th>model</th>{CELL_HEADS}</tr>"
    );
    for (k, cell) in chosen.group(&[By::Model]) {
        let _ = write!(out, "<tr><td>{}</td>{}</tr>", esc(&k[0]), cells_row(&cell));
    }
    out.push_str("</table>");
    if chosen.overflow > 0 {
        let _ = write!(
            out,
            "<p class=\"cooling\">{} answers were counted under model <code>other</code>: the \
             series limit (GB_USAGE_MAX_SERIES) was reached.</p>",
            chosen.overflow
        );
    }

    let errors: Vec<ErrorEntry> = gw.usage.recent_errors(gw.store()).await.unwrap_or_default();
    let _ = write!(
        out,
        "<h3>Recent upstream errors ({})</h3><table id=\"errors\"><tr><th>time (UTC)</th><th>key</th>\
         <th>model</th><th>route</th><th>status</th><th>Google status</th><th>reason</th><th>retry after</th></tr>",
        errors.len()
    );
    for e in &errors {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            iso_minute(e.time_ms),
            esc(&e.key_id),
            esc(&e.model),
            esc(&e.route),
            e.status,
            esc(e.google_status.as_deref().unwrap_or("")),
            esc(e.reason.as_deref().unwrap_or("")),
            e.retry_delay_s.map(|s| format!("{s} s")).unwrap_or_default()
        );
    }
    out.push_str("</table>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_round_trip_through_the_calendar() {
        let ms = parse_time("2026-11-29", false).unwrap();
        assert_eq!(iso_hour(ms), "2026-11-29T00:00Z");
        assert_eq!(
            iso_hour(parse_time("2026-11-29", true).unwrap()),
            "2026-11-29T23:00Z"
        );
        assert_eq!(
            iso_hour(parse_time("2024-02-29T13:45", false).unwrap()),
            "2024-02-29T13:00Z"
        );
        assert_eq!(parse_time("1700000000", false), Some(1_700_000_000_000));
        assert_eq!(parse_time("2026-13-01", false), None);
        assert_eq!(
            parse_time("2024-02-29 13:45", false),
            parse_time("2024-02-29T13:45Z", false)
        );
        assert_eq!(parse_time("2024-02-29T25:00", false), None);
        assert_eq!(parse_time("1969-12-31", false), None);
        assert_eq!(
            parse_time("2026-11-29T02:00:00+02:00", false),
            parse_time("2026-11-29T00:00", false),
            "a numeric offset is applied, not dropped"
        );
        assert_eq!(
            parse_time("2026-11-29T09:00+02:00", false),
            parse_time("2026-11-29T07:00", false)
        );
        assert_eq!(
            parse_time("2026-11-28T19:00-05:00", false),
            parse_time("2026-11-29T00:00Z", false)
        );
        assert_eq!(parse_time("1969-12-31T23:00:00Z", false), None);
        assert_eq!(
            parse_time("2026-11-29T09:00 02:00", false),
            parse_time("2026-11-29T07:00", false),
            "a `+` a query string turned into a space"
        );
        assert_eq!(parse_time("yesterday", false), None);
        for bad in [
            "2026-02-29",
            "2026-04-31",
            "1969-12-31",
            "2026-11-29T24:00",
            "2026-11-29Tnoon",
        ] {
            assert_eq!(parse_time(bad, false), None, "{bad}");
        }
        assert_eq!(
            iso_minute(parse_time("2024-02-29T13:45", false).unwrap() + 7_000),
            "2024-02-29T13:45:07Z"
        );
        assert_eq!(
            iso_date(parse_time("2026-12-31", true).unwrap()),
            "2026-12-31"
        );
        assert!(iso_hour(u64::MAX).starts_with("9999-12-"));
    }

    #[test]
    fn ranges_default_to_the_last_day_by_model_and_refuse_nonsense() {
        let now = 1_800_000_000_000;
        let r = range("", now).unwrap();
        assert_eq!((r.to - r.from, r.by), (DAY_MS - 1, vec![By::Model]));
        let r = range("by=key%2Cmodel&from=2026-11-01", now).unwrap();
        assert_eq!(r.by, vec![By::Key, By::Model]);
        assert!(range("by=nope", now).is_err());
        assert!(range("from=2026-11-02&to=2026-11-01", now).is_err());
    }
}
