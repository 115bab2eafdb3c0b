// The consent portal: a same-origin client of dnsgate's consent API (see /openapi.json). The server
// renders the same page with the device's state (it works without JavaScript); this script takes it
// over: it re-renders from the API, submits the page's forms as JSON, and pairs DNS with HTTP.
// Strings come from strings.json (lang/<language>.json on the server); nothing is loaded from
// elsewhere, and nothing from the API or the URL is ever parsed as HTML (textContent only).
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  let S = {};
  let lang = "en";
  let notice = null;   // GET /v1/notice
  let catalog = null;  // GET /v1/vendors
  let state = null;    // the latest consent state (GET/PUT/DELETE /v1/consent)
  let who = null;      // GET /v1/whoami

  // -- helpers -----------------------------------------------------------------------------------
  const t = (key, vars = {}) =>
    Object.entries(vars).reduce((s, [k, v]) => s.split(`{${k}}`).join(String(v)), S[key] ?? key);

  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props)) {
      if (k === "text") node.textContent = v;
      else if (k === "class") node.className = v;
      else node.setAttribute(k, v);
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c);
    return node;
  }

  const when = (iso) => (iso ? new Date(iso).toLocaleString(lang, { dateStyle: "medium", timeStyle: "short" }) : "");

  async function api(method, path, body) {
    const init = { method, cache: "no-store", headers: {} };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    const data = await response.json().catch(() => null);
    if (!response.ok) {
      const e = (data && data.error) || {};
      throw Object.assign(new Error(e.message || response.statusText), { status: response.status, code: e.code });
    }
    return data;
  }

  // return_to: only an http(s) URL, never javascript:, data: or credentials; shown as its host.
  function returnTo() {
    const raw = new URLSearchParams(location.search).get("return_to");
    if (!raw) return null;
    let url;
    try { url = new URL(raw); } catch { return null; }
    if ((url.protocol !== "http:" && url.protocol !== "https:") || url.username || url.password) return null;
    return url;
  }

  const categoryName = (id) => (catalog.categories.find((c) => c.id === id) || { name: id }).name;
  const fixedProfile = () => state.profile.name === "deny" || state.profile.name === "allow";

  function describe(decision) {
    if (decision.by_choice) {
      const key = decision.allowed ? "state_allowed_choice" : decision.until ? "state_blocked_choice" : "state_blocked_standing";
      return t(key, { since: when(decision.since), until: when(decision.until) });
    }
    if (fixedProfile()) return t(decision.allowed ? "state_allowed_default" : "state_blocked_network");
    return t(decision.allowed ? "state_allowed_default" : "state_blocked_default");
  }

  // -- rendering ---------------------------------------------------------------------------------
  function applyStrings() {
    document.documentElement.lang = lang;
    for (const node of document.querySelectorAll("[data-t]")) node.textContent = t(node.dataset.t);
    document.title = t("title");
  }

  function renderNotice() {
    const box = $("notice-text");
    box.replaceChildren();
    const entry = notice.languages[lang] || notice.languages[notice.default_language];
    for (const paragraph of entry.text.split(/\n\s*\n/)) box.append(el("p", { text: paragraph.replace(/\s*\n\s*/g, " ") }));
  }

  // The summary counts what the overview lists: every vendor and every block list (as the server's page).
  function summaryKey(vendors, lists, allowed) {
    const total = vendors + lists;
    if (total === 0) return "summary_nothing";
    if (total === 1 && lists) return allowed ? "summary_one_list_allowed" : "summary_one_list_blocked";
    if (total === 1) return allowed ? "summary_one_allowed" : "summary_one_blocked";
    const keys = lists ? ["summary_items_none_allowed", "summary_items_some_allowed", "summary_items_all_allowed"]
      : ["summary_none_allowed", "summary_some_allowed", "summary_all_allowed"];
    return keys[allowed === 0 ? 0 : allowed === total ? 2 : 1];
  }

  function overviewRow(kind, item, text) {
    return el("li", { class: item.allowed ? "allowed" : "blocked", ["data-" + kind]: item.id,
      "data-state": item.allowed ? "allowed" : "blocked" }, el("span", { class: "dot", "aria-hidden": "true" }), text);
  }

  function renderFirst() {
    const vendors = state.vendors;
    const lists = state.lists;
    const allowed = [...vendors, ...lists].filter((v) => v.allowed).length;
    const total = vendors.length + lists.length;
    const key = summaryKey(vendors.length, lists.length, allowed);
    $("summary").textContent = `${t(key, { allowed, total })} ${t("profile_" + state.profile.name)}`;
    $("overview").replaceChildren(
      ...vendors.map((v) => overviewRow("vendor", v,
        t("overview_item", { vendor: v.name, category: categoryName(v.category), state: describe(v) }))),
      ...lists.map((l) => overviewRow("list", l,
        t("overview_list", { list: l.name, category: categoryName(l.category), state: describe(l) }))));

    const gpc = state.sec_gpc === "1" || navigator.globalPrivacyControl === true;
    $("gpc").hidden = !gpc;
    if (gpc) $("gpc").textContent = `${t("gpc_sent")} ${t("gpc_" + state.profile.name)}`;

    const choice = state.choice && state.choice.active ? state.choice : null;
    const terms = Object.values(notice.languages).map((l) => l.terms_sha256);
    const grants = choice && (Object.values(choice.categories).some(Boolean) || Object.values(choice.vendors).some(Boolean));
    const stale = grants && !terms.includes(choice.terms_sha256);
    $("stale").hidden = !stale;
    if (stale) $("stale").textContent = t("stale", { when: when(choice.made_at) });
    const fresh = stale ? [] : state.new;
    $("new").hidden = !fresh.length;
    if (fresh.length) $("new").textContent = t("new_items", { what: fresh.map((i) => i.name).join(t("list_separator")) });
    $("in-force").textContent = !choice ? t("in_force_none")
      : t(choice.subject.network ? "in_force_network" : choice.channel === "admin" ? "in_force_admin" : "in_force",
        { when: when(choice.made_at), until: choice.refusals_stand ? t("until_changed") : when(choice.expires_at) });

    $("ask-again").hidden = !state.ask_again_after;
    if (state.ask_again_after) {
      $("ask-again").textContent = t("ask_again", { when: when(choice && choice.made_at), until: when(state.ask_again_after) });
    }

    const fixed = fixedProfile();
    $("decide").hidden = fixed;
    $("choose").hidden = fixed;
    const kiosk = state.profile.name === "kiosk";
    const layout = kiosk || new URLSearchParams(location.search).get("layout") === "kiosk";
    document.body.classList.toggle("kiosk", layout);
    $("kiosk").hidden = !layout || fixed;
    if (layout) {
      $("kiosk-text").textContent = kiosk ? t("kiosk_text", { minutes: state.kiosk ? state.kiosk.idle_minutes : "" })
        : t("kiosk_layout_text");
    }

    const back = returnTo();
    $("return").hidden = !back;
    if (back) {
      $("return-link").href = back.href;
      $("return-link").textContent = t("return_link", { host: back.host });
    }
  }

  function vendorCard(facts, decision) {
    const details = el("details", {},
      el("summary", { text: t("vendor_details", { vendor: facts.name }) }),
      el("h4", { text: t("vendor_data") }),
      el("ul", {}, ...facts.data_collected.map((d) => el("li", { text: d }))),
      el("h4", { text: t("vendor_cookies") }),
      cookieTable(facts.cookies),
      el("h4", { text: t("vendor_recipients") }),
      el("p", { text: facts.recipients }),
      facts.ccpa_sale_or_share ? el("p", { text: t("vendor_sells") }) : null,
      el("h4", { text: t("vendor_names") }),
      el("ul", { class: "names" }, ...facts.domains.map((d) => el("li", {}, el("code", { text: d.pattern }), ` ${d.serves}`))),
      facts.privacy_policy ? el("p", {}, el("a", { href: facts.privacy_policy, rel: "noopener noreferrer",
        text: t("vendor_policy", { vendor: facts.name }) })) : null);
    const purposes = facts.tcf_purposes.map((p) => t(`tcf_${p}`)).join(t("list_separator"));
    return el("article", { class: "vendor", "data-vendor": facts.id, "aria-labelledby": `v-${facts.id}` },
      el("h3", { id: `v-${facts.id}`, text: facts.name }),
      el("p", { class: `state ${decision.allowed ? "allowed" : "blocked"}`, "data-state": decision.allowed ? "allowed" : "blocked",
        text: describe(decision) }),
      el("p", { text: facts.summary }),
      purposes ? el("p", { class: "muted", text: `${t("vendor_purposes")}: ${purposes}` }) : null,
      details);
  }

  function cookieTable(cookies) {
    const head = el("tr", {}, ...["cookie_name", "cookie_purpose", "cookie_duration"].map((k) => el("th", { scope: "col", text: t(k) })));
    const rows = cookies.map((c) => el("tr", {}, el("td", {}, el("code", { text: c.name })), el("td", { text: c.purpose }),
      el("td", { text: c.duration })));
    return el("div", { class: "table-scroll" }, el("table", {}, el("thead", {}, head), el("tbody", {}, ...rows)));
  }

  function renderCategories() {
    const list = $("category-list");
    list.replaceChildren();
    for (const category of catalog.categories) {
      const decision = state.by_category[category.id] || { allowed: false, by_choice: false };
      const box = el("input", { type: "checkbox", id: `cat-${category.id}`, name: "grant", value: category.id });
      box.checked = decision.allowed;
      const vendors = catalog.vendors.filter((v) => v.category === category.id);
      const lists = catalog.lists.filter((l) => l.category === category.id);
      const fieldset = el("fieldset", { class: "category", "data-category": category.id },
        el("legend", { text: category.name }),
        el("p", { text: category.description }),
        el("div", { class: "switch" }, box, el("label", { for: box.id, text: t("category_allow", { category: category.name }) })),
        el("p", { class: `state ${decision.allowed ? "allowed" : "blocked"}`, "data-state": decision.allowed ? "allowed" : "blocked",
          text: t("category_state", { state: describe(decision) }) }));
      for (const facts of vendors) {
        const vendorDecision = state.vendors.find((v) => v.id === facts.id);
        if (vendorDecision) fieldset.append(vendorCard(facts, vendorDecision));
      }
      if (lists.length) {
        const listState = (l) => state.lists.find((d) => d.id === l.id) || decision;
        fieldset.append(el("h3", { text: t("lists_heading") }), el("ul", {}, ...lists.map((l) => el("li", { "data-list": l.id,
          "data-state": listState(l).allowed ? "allowed" : "blocked",
          text: t("list_item", { name: l.name, entries: l.entries.toLocaleString(lang), state: describe(listState(l)) }) }))));
      }
      if (!vendors.length && !lists.length) fieldset.append(el("p", { class: "muted", text: t("no_vendors") }));
      list.append(fieldset);
    }
    const granted = [...state.vendors, ...state.lists].some((v) => v.allowed && v.by_choice)
      || Object.values(state.by_category).some((d) => d.allowed && d.by_choice);
    $("withdraw").hidden = !granted;
  }

  function renderDevice() {
    if (!who) return;
    const { address, mac } = who.http;
    $("device-text").textContent = mac ? t("device_mac", { address, mac }) : t("device_text", { address });
    const dns = who.dns;
    $("pairing-text").hidden = !dns || dns.address === address;
    if (dns && dns.address !== address) $("pairing-text").textContent = t("pairing_done", { address: dns.address, when: when(dns.paired_at) });
  }

  function render() {
    renderFirst();
    renderCategories();
    renderDevice();
  }

  // -- acting ------------------------------------------------------------------------------------
  function shown() {
    const entry = notice.languages[lang] ? lang : notice.default_language;
    return { notice: { version: notice.version, sha256: notice.languages[entry].sha256 }, language: entry, channel: "portal" };
  }

  // Resolve <token>.pair.<portal host> through the device's own resolver, so dnsgate can bind the
  // DNS source it sees to this choice when it differs from the HTTP address. The fetch itself is
  // meant to fail: the name has no address.
  function pair(pairing) {
    if (!pairing || !pairing.name) return;
    fetch(`${location.protocol}//${pairing.name}/`, { mode: "no-cors", cache: "no-store" }).catch(() => {})
      .finally(() => setTimeout(refreshWho, 1500));
  }

  // dnsgate grants only the address that asks. When this device's HTTP and DNS use different
  // families (HTTP over IPv4, DNS over IPv6), the same change goes through the API's address of the
  // other family too (v4./v6.<portal host>, which the device's DNS answers in that family), naming
  // this answer's pairing token: each address records its own choice. Where that family does not
  // reach dnsgate, nothing happens there.
  async function elsewhere(method, path, body, pairing) {
    const host = pairing && pairing.name ? pairing.name.split(".pair.")[1] : "";
    if (!host || !who || location.protocol !== "http:") return;
    const family = who.http.address.includes(":") ? "v4" : "v6";
    const init = { method, mode: "cors", cache: "no-store", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(method === "PUT" ? { ...body, pairing: pairing.token } : (body || {})) };
    try {
      await fetch(`http://${family}.${host}${location.port ? ":" + location.port : ""}${path}`, init);
    } catch { /* not reachable over that family */ }
  }

  async function refreshWho() {
    try { who = await api("GET", "/v1/whoami"); renderDevice(); } catch { /* shown on the next load */ }
  }

  function say(lines, kind = "ok") {
    const box = $("result");
    box.className = `result ${kind}`;
    box.setAttribute("role", kind === "error" ? "alert" : "status");
    box.replaceChildren(...lines.map((line) => el("p", { text: line })));
  }

  // While a change is on its way further clicks are ignored; buttons are not disabled, because a
  // disabled button loses keyboard focus.
  let busy = false;

  async function act(method, path, body, outcome) {
    if (busy) return;
    const before = state;
    busy = true;
    const buttons = document.querySelectorAll("button");
    buttons.forEach((b) => b.setAttribute("aria-disabled", "true"));
    say([t("working")]);
    try {
      state = await api(method, path, body);
      render();
      // 202: a refusal in force at once that the consent store records once it is back.
      say(state.held ? [t("result_held"), t("result_cache")] : outcome(state, before), state.held ? "warn" : undefined);
      if (method !== "POST") await elsewhere(method, path, body, state.pairing);  // (a session end reaches it)
      pair(state.pairing);
    } catch (e) {
      if (e.code === "notice_changed") {
        await load();
        say([t("result_notice_changed")], "warn");
      } else {
        say([t("result_error", { message: e.message })], "error");
      }
    } finally {
      buttons.forEach((b) => b.removeAttribute("aria-disabled"));
      busy = false;
    }
  }

  function grantedOutcome(s) {
    const open = s.vendors.filter((v) => v.allowed).map((v) => v.name);
    const lists = s.lists.filter((l) => l.allowed).map((l) => l.name);
    const what = [...open, ...lists];
    if (!what.length) return [t("result_refused")];
    return [t("result_granted", { what: what.join(t("list_separator")) }), t("result_cache")];
  }

  // Something was allowed by a choice: only then may an open page still hold a tracker's answer.
  const hadGrant = (s) => !!s && [...s.vendors, ...s.lists].some((v) => v.allowed && v.by_choice);

  const refusedOutcome = (s, before) => ([...s.vendors, ...s.lists].some((v) => v.allowed) ? grantedOutcome(s)
    : hadGrant(before) ? [t("result_refused"), t("result_cache")] : [t("result_refused")]);

  // The page's forms post to POST / without JavaScript; here they go to the JSON API.
  function accept(event) {
    event.preventDefault();
    act("PUT", "/v1/consent", { categories: catalog.categories.map((c) => c.id), ...shown() }, grantedOutcome);
  }

  function reject(event) {
    event.preventDefault();
    act("PUT", "/v1/consent", { categories: [], ...shown() }, refusedOutcome);
  }

  function save(event) {
    event.preventDefault();
    const choices = Object.fromEntries(catalog.categories.map((c) => [c.id, $(`cat-${c.id}`).checked]));
    act("PUT", "/v1/consent", { choices, ...shown() }, grantedOutcome);
  }

  function withdraw(event) {
    event.preventDefault();
    act("DELETE", "/v1/consent", shown(), (s, before) => (hadGrant(before)
      ? [t("result_withdrawn"), t("result_cache")] : [t("result_refused")]));
  }

  // On a kiosk network the session's choices reset; the kiosk layout elsewhere withdraws every grant
  // (a reset there would also forget an opt-out).
  function endSession(event) {
    event.preventDefault();
    if (state.profile.name === "kiosk") act("POST", "/v1/session/end", undefined, () => [t("result_session_ended")]);
    else act("DELETE", "/v1/consent", shown(), () => [t("result_session_withdrawn")]);
  }

  // -- start -------------------------------------------------------------------------------------
  async function load() {
    // The facts in the language the notice is shown in: the choice records what that language showed.
    const facts = api("GET", "/v1/notice").then((n) => {
      notice = n;
      return api("GET", `/v1/vendors?lang=${encodeURIComponent(shown().language)}`);
    });
    [catalog, state, who] = await Promise.all([facts, api("GET", "/v1/consent"), api("GET", "/v1/whoami")]);
    renderNotice();
    render();
  }

  async function start() {
    const strings = await fetch("/portal/strings.json", { cache: "no-cache" }).then((r) => r.json());
    // The server picked the page's language from Accept-Language: keep it.
    const wanted = [document.documentElement.lang, ...(navigator.languages || []), "en"].map((l) => l.toLowerCase());
    lang = wanted.map((l) => (strings[l] ? l : l.split("-")[0])).find((l) => strings[l]) || "en";
    S = strings[lang];
    applyStrings();
    try {
      await load();
    } catch (e) {
      $("loading").textContent = t("load_failed", { message: e.message });
      return;
    }
    $("loading").hidden = true;
    for (const id of ["first", "notice", "choose", "device"]) $(id).hidden = id === "choose" && fixedProfile();
    $("accept-all").addEventListener("click", accept);
    $("reject-all").addEventListener("click", reject);
    $("categories").addEventListener("submit", save);
    $("withdraw").addEventListener("click", withdraw);
    $("end-session").addEventListener("click", endSession);
    document.body.dataset.ready = "true";
  }

  document.addEventListener("DOMContentLoaded", start);
})();
