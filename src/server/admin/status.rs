//! The status page: each agency's progress, the draw, the store. Plain
//! HTML from the central itself, no external assets and no build step. With
//! JavaScript a small inline script fetches the live part (`/live`) every
//! second and swaps it in; without, the page refreshes itself every few
//! seconds. It shows counts and times only: never a bettor's name or
//! document.

use std::fmt::Write;
use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};

use super::{Live, Shared, StoreView};

/// Seconds between refreshes of the page when JavaScript is off.
const REFRESH_SECS: u32 = 3;

/// The whole page.
pub(super) async fn page(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let live = match shared.guard(&headers) {
        Ok(live) => live,
        Err(refusal) => return refusal.into_response(),
    };
    let body = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>lottery central</title>\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <noscript><meta http-equiv=\"refresh\" content=\"{REFRESH_SECS}\"></noscript>\
         <style>{STYLE}</style></head>\n<body><h1>lottery central</h1>\
         <main id=\"live\">{}</main>\
         <p class=\"note\">Refreshed every second (every {REFRESH_SECS} s without JavaScript). \
         Metrics for Prometheus: <a href=\"/metrics\">/metrics</a>.</p>\
         <script>{SCRIPT}</script></body></html>\n",
        live_part(live).await
    );
    html(body)
}

/// The live part alone, for the page's script.
pub(super) async fn part(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    match shared.guard(&headers) {
        Ok(live) => html(live_part(live).await),
        Err(refusal) => refusal.into_response(),
    }
}

fn html(body: String) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

/// Polls `/live` with the page's own credentials (the browser resends them)
/// and swaps it in; on an error the page stays as it was.
const SCRIPT: &str = "setInterval(async()=>{try{const r=await fetch('/live',{cache:'no-store'});\
if(r.ok){document.getElementById('live').innerHTML=await r.text();\
document.body.dataset.live='polling';}}catch(e){}},1000);";

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}\
table{border-collapse:collapse;margin:.5em 0 1.5em}\
th,td{border:1px solid #bbb;padding:.3em .8em;text-align:right}\
th{background:#eee}td.l,th.l{text-align:left}\
.yes{color:#065f12;font-weight:600}.no{color:#888}\
.state{font-size:1.3em;font-weight:700}.note{color:#666;font-size:.9em}\
code{font-size:.85em;word-break:break-all}";

/// The part that changes: the draw, the agencies, the store.
async fn live_part(live: &Live) -> String {
    let lottery = &live.lottery;
    let mut agencies = lottery.agencies_view();
    // With a shared store, what the other centrals stored and who finished
    // there too.
    let (_, _, everywhere) = lottery.status_everywhere().await;
    for state in everywhere {
        if let Some(view) = agencies.iter_mut().find(|v| v.agency == state.agency) {
            view.stored = view.stored.max(state.held);
            view.finished |= state.finished;
        }
    }
    let draw = lottery.draw();
    let phase = lottery.phase();
    let finished = agencies.iter().filter(|a| a.finished).count();
    let mut out = String::new();
    let _ = write!(
        out,
        "<section><h2>Draw</h2><p>state: <span class=\"state\" id=\"draw-state\">{}</span>",
        phase.name()
    );
    match &draw {
        Some(draw) => {
            let _ = write!(
                out,
                " &middot; drawn at <span id=\"drawn-at\">{}</span> &middot; {} bets &middot; \
                 winning number {}</p><p>seal: <code id=\"seal\">{}</code></p>",
                escape(&draw.drawn_at),
                draw.bets,
                draw.winning_number,
                draw.seal
            );
        }
        None => {
            let _ = write!(
                out,
                " &middot; <span id=\"finished\">{finished} of {} agencies finished</span></p>",
                agencies.len()
            );
        }
    }
    // Sales: open, or who closed them, when and why.
    let _ = write!(
        out,
        "<p>sales: <span id=\"sales\">{}</span></p>",
        lottery.closed().map_or_else(
            || "open".to_string(),
            |close| escape(close.to_string().trim_start_matches("sales "))
        )
    );
    out.push_str(
        "</section><section><h2>Agencies</h2><table id=\"agencies\"><thead><tr>\
         <th>agency</th><th>bets stored</th><th>finished</th><th>connected</th>\
         <th class=\"l\">last seen (UTC)</th><th>winners</th></tr></thead><tbody>",
    );
    for a in &agencies {
        let winners = draw.as_ref().map_or_else(
            || "&ndash;".to_string(),
            |d| d.winners.get(&a.agency).map_or(0, Vec::len).to_string(),
        );
        let _ = write!(
            out,
            "<tr id=\"agency-{id}\"><td>{id}</td><td>{stored}</td>{finished}{connected}\
             <td class=\"l\">{seen}</td><td>{winners}</td></tr>",
            id = a.agency,
            stored = a.stored,
            finished = yes_no(a.finished),
            connected = yes_no(a.connected),
            seen = a.last_seen.map_or_else(|| "&ndash;".to_string(), shown),
        );
    }
    out.push_str("</tbody></table></section><section><h2>Store</h2><p>");
    match &live.store {
        StoreView::File(path) => {
            let _ = write!(
                out,
                "file: <code id=\"storage\">{}</code></p>",
                escape(path)
            );
        }
        StoreView::Database { url, store } => {
            let _ = write!(
                out,
                "database: <code id=\"storage\">{}</code> &middot; primary: \
                 <code id=\"primary\">{}</code></p>",
                escape(url),
                escape(store.primary().as_deref().unwrap_or("unknown"))
            );
        }
    }
    out.push_str("</section>");
    out
}

fn yes_no(on: bool) -> &'static str {
    if on {
        "<td class=\"yes\">yes</td>"
    } else {
        "<td class=\"no\">no</td>"
    }
}

/// A time as the page shows it.
fn shown(at: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(at)
        .format("%Y-%m-%d %H:%M:%S")
        .to_string()
}

/// Text made safe for HTML.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}
