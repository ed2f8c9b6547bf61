/* Bookshop — live dashboard.
 *
 * One WebSocket to the gateway carries every live channel. The page is meant to stay open all day, so it is
 * built around resuming: the last seq and the epoch of every channel are kept, and after a reconnect (or a
 * token refresh) the client re-authenticates and re-subscribes with `after` = that seq and that `epoch`, so
 * nothing is missed or applied twice; the header says how many events the resume caught up. Today's totals
 * (staff) are read from GET /api/v1/orders/summary on load and again when an order event says they changed:
 * events move the tiles, nothing polls. Server data only ever reaches the DOM through textContent.
 *
 * Tokens (docs/security.md, "The dashboard's sign-in"): the access token lives in memory only; the refresh
 * token in sessionStorage (this tab, until it closes), never localStorage. Signing out revokes the login.
 */
(function () {
  "use strict";

  // ---- constants ------------------------------------------------------------------------------------

  const API = "/api/v1";
  const PUBLIC_CHANNELS = ["inventory", "books"];
  const PRIVATE_CHANNELS = ["orders", "orders:mine"];
  const FULL_CHANNELS = ["inventory", "books", "orders"]; // unfiltered: every seq of the stream arrives
  const LOW_STOCK = 5;
  const MAX_ORDERS = 200;
  const MAX_FEED = 60;
  const MAX_RECEIVED = 5000;
  const CHART_MINUTES = 60;
  const FLASH_MS = 1600;
  const BACKOFF_START_MS = 500;
  const BACKOFF_MAX_MS = 10000;
  const AUTH_REPLY_TIMEOUT_MS = 5000;     // don't hold public channels hostage to a silent auth reply
  const RESUBSCRIBE_MS = 2000;            // retry of a channel whose service was unavailable
  const TITLE_FETCH_CONCURRENCY = 3;
  const TITLE_FETCH_DELAY_MS = 300;       // give the books snapshot a chance to fill the cache first
  const TITLE_RETRY_AFTER_MS = 60000;
  const REFRESH_KEY = "bookshop.refresh"; // sessionStorage: the refresh token only
  // The users service takes a refresh token presented again more than 10 s after its first use for a stolen
  // one (docs/security.md): a lost refresh answer is tried again once, soon, and only well inside that grace.
  const REFRESH_RETRY_MS = 2000;
  const REFRESH_RETRY_WITHIN_MS = 8000;   // from the token's first use to the retry: 2 s of margin on the 10 s
  const CONFIRM_CANCEL_MS = 4000;
  const TOTALS_GAP_MS = 1000;             // at most one read of today's totals a second, however busy the shop
  const TOTALS_SETTLE_MS = 80;            // an order's events come in twos (created, decided): read after both

  // ---- state ----------------------------------------------------------------------------------------

  /** What tests (and curious humans in the console) can see. lastSeq is mutated in place, never replaced. */
  const dashboard = {
    lastSeq: {},
    epochs: {},
    received: {},        // channel -> seqs of the events applied (bounded): a gap would show here
    state: "connecting",
    attempt: 0,
    socket: null,
    user: null,
    subscriptions: {},   // channel -> "pending" | "active"
    resume: null,        // the last reconnect: {channels: {channel: {after, head, caughtUp, reset}}, done}
    totals: null,
    totalsReads: 0,
  };
  window.bookshopDashboard = dashboard;

  const session = {
    accessToken: null,     // memory only
    refreshToken: null,    // memory, and sessionStorage so a reload keeps the sign-in
    expiresAt: 0,          // ms since epoch
    refreshTimer: null,
    refreshing: null,      // the in-flight refresh promise, shared by every caller
    generation: 0,         // moves on at each sign-out: an answer for an older sign-in is dropped
    firstUse: null,        // { token, at, retried }: when the current refresh token was first sent
  };

  const conn = {
    attempts: 0,           // consecutive failed connections, drives the backoff and the "attempt n" label
    everLive: false,
    reconnectTimer: null,
    countdownTimer: null,
    authPending: false,
    authTimer: null,
    authenticated: false,  // the *socket* is authenticated (not just the HTTP session)
    authSettled: false,    // the socket's auth was answered (or given up on): private channels are decided
    socketRole: null,
    expiredRetries: 0,     // guards against a refresh/re-auth loop if the server keeps refusing
    resubscribeTimer: null,
    sent: {},              // channel -> {after, epoch} of the subscribe in flight
  };

  // ---- DOM helpers ----------------------------------------------------------------------------------

  const $ = (id) => document.getElementById(id);

  const ui = {
    body: document.body,
    connState: $("conn-state"),
    connDetail: $("conn-detail"),
    signinForm: $("signin-form"),
    signinButton: $("signin-button"),
    email: $("signin-email"),
    password: $("signin-password"),
    userPanel: $("user-panel"),
    userInfo: $("user-info"),
    signoutButton: $("signout-button"),
    authError: $("auth-error"),
    todayMeta: $("today-meta"),
    tiles: {
      confirmed: $("tile-confirmed"),
      revenue: $("tile-revenue"),
      cancellations: $("tile-cancellations"),
      open: $("tile-open"),
      low: $("tile-low"),
    },
    lowList: $("tile-low-list"),
    chartBars: $("chart-bars"),
    chartGrid: $("chart-grid"),
    chartDesc: $("chart-desc"),
    chartMeta: $("chart-meta"),
    feed: $("event-feed"),
    stockTable: $("stock-table"),
    stockBody: $("stock-body"),
    stockEmpty: $("stock-empty"),
    stockSummary: $("stock-summary"),
    stockFilter: $("stock-filter"),
    orderList: $("order-list"),
    ordersHint: $("orders-hint"),
  };

  const SVG_NS = "http://www.w3.org/2000/svg";

  /** Creates an element with a class and text; text goes through textContent only. */
  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    return node;
  }

  /** Highlights a changed node. A timer (not animationend) takes the class off, so it ends the same way
   * when prefers-reduced-motion turns the animation into a still outline. */
  function flash(node) {
    node.classList.remove("flash");
    void node.offsetWidth; // a reflow, so the animation starts again
    node.classList.add("flash");
    node.dataset.flashes = String(Number(node.dataset.flashes || 0) + 1);
    clearTimeout(node._flashTimer);
    node._flashTimer = setTimeout(() => node.classList.remove("flash"), FLASH_MS);
  }

  function shortId(id) {
    const text = String(id);
    return text.length > 8 ? "…" + text.slice(-6) : text;
  }

  const moneyFormats = new Map();
  function formatMoney(cents, currency) {
    if (cents === undefined || cents === null || !Number.isFinite(Number(cents))) return "";
    const amount = Number(cents) / 100;
    const code = typeof currency === "string" && /^[A-Za-z]{3}$/.test(currency) ? currency.toUpperCase() : null;
    if (!code) return amount.toFixed(2);
    if (!moneyFormats.has(code)) {
      try {
        moneyFormats.set(code, new Intl.NumberFormat(undefined, { style: "currency", currency: code }));
      } catch (_) {
        moneyFormats.set(code, null);
      }
    }
    const fmt = moneyFormats.get(code);
    return fmt ? fmt.format(amount) : amount.toFixed(2) + " " + code;
  }

  function formatTime(iso) {
    const date = iso ? new Date(iso) : null;
    if (!date || Number.isNaN(date.getTime())) return { text: "", iso: "" };
    const sameDay = date.toDateString() === new Date().toDateString();
    return {
      text: sameDay ? date.toLocaleTimeString() : date.toLocaleString(),
      iso: date.toISOString(),
    };
  }

  function plural(n, one, many) {
    return n + " " + (n === 1 ? one : many);
  }

  // ---- connection state display --------------------------------------------------------------------

  function setState(state, label) {
    dashboard.state = state;
    ui.connState.dataset.state = state;
    const labels = {
      connecting: "connecting…",
      live: "live",
      reconnecting: "reconnecting…",
      offline: "offline",
    };
    ui.connState.textContent = label || labels[state] || state;
  }

  function setDetail(text) {
    ui.connDetail.textContent = text || "";
  }

  function showReconnectCountdown(deadline) {
    clearInterval(conn.countdownTimer);
    const tick = () => {
      const seconds = Math.max(1, Math.ceil((deadline - Date.now()) / 1000));
      setState("reconnecting", "reconnecting (attempt " + conn.attempts + ")");
      setDetail("next try in " + seconds + " s");
    };
    tick();
    conn.countdownTimer = setInterval(tick, 500);
  }

  // ---- HTTP API -------------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, message, requestId) {
      super(message || code || "request failed");
      this.status = status;
      this.code = code;
      this.requestId = requestId;
    }
  }

  /** JSON request to the gateway; errors become ApiError with the contract's code and request id. */
  async function apiRequest(method, path, body, { auth = false, retryOn401 = true } = {}) {
    const headers = { Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (auth && session.accessToken) headers.Authorization = "Bearer " + session.accessToken;

    let response;
    try {
      response = await fetch(API + path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        credentials: "same-origin",
        cache: "no-store",
      });
    } catch (err) {
      throw new ApiError(0, "network_error", "Network error: the gateway could not be reached.");
    }

    let payload = null;
    try {
      payload = response.status === 204 ? null : await response.json();
    } catch (_) {
      payload = null;
    }

    // A 401 on an authenticated call usually means the access token just expired: refresh once and retry.
    if (response.status === 401 && auth && retryOn401 && session.refreshToken) {
      await refreshTokens();
      return apiRequest(method, path, body, { auth, retryOn401: false });
    }
    if (!response.ok) {
      const err = (payload && payload.error) || {};
      throw new ApiError(response.status, err.code || "http_" + response.status,
        err.message || response.statusText, err.request_id || response.headers.get("X-Request-ID"));
    }
    return payload;
  }

  // ---- session: tokens, refresh, current user ------------------------------------------------------

  function storeTokens(tokens) {
    session.accessToken = tokens.access_token;
    if (tokens.refresh_token) session.refreshToken = tokens.refresh_token;
    const lifetime = Number(tokens.expires_in) > 0 ? Number(tokens.expires_in) : 300;
    session.expiresAt = Date.now() + lifetime * 1000;
    try {
      sessionStorage.setItem(REFRESH_KEY, session.refreshToken);
    } catch (_) { /* storage can be disabled: memory is enough, a reload then asks to sign in again */ }
    scheduleRefresh();
  }

  function savedRefreshToken() {
    try {
      const saved = sessionStorage.getItem(REFRESH_KEY);
      return saved && /^[A-Za-z0-9._~+\/=-]{16,512}$/.test(saved) ? saved : null;
    } catch (_) {
      return null;
    }
  }

  function clearSession() {
    session.generation += 1; // whatever is still in flight for this sign-in is no longer ours to keep
    session.firstUse = null;
    clearTimeout(session.refreshTimer);
    session.accessToken = session.refreshToken = null;
    session.expiresAt = 0;
    session.refreshing = null;
    try { sessionStorage.removeItem(REFRESH_KEY); } catch (_) { /* ignore */ }
    // an earlier version kept the whole session here
    try { sessionStorage.removeItem("bookshop.session"); } catch (_) { /* ignore */ }
  }

  /** Refreshes a minute before expiry (or at 80% of a short lifetime), so the socket never sees it lapse. */
  function scheduleRefresh() {
    clearTimeout(session.refreshTimer);
    const remaining = session.expiresAt - Date.now();
    const lead = Math.min(60000, remaining * 0.2);
    const delay = Math.max(5000, remaining - lead);
    session.refreshTimer = setTimeout(() => {
      refreshTokens()
        .then(sendAuth)
        .catch(() => { /* refreshTokens already handled the failure */ });
    }, delay);
  }

  /** One refresh at a time; concurrent callers share the same promise. A refused refresh signs out.
   *
   * The users service rotates the refresh token on each use, and takes the same token presented again more
   * than 10 s after its first use for theft (it ends the login everywhere). So a refresh
   * whose answer was lost (network error, 5xx, 429) is tried again once, REFRESH_RETRY_MS later and only while
   * that is still well inside the grace (REFRESH_RETRY_WITHIN_MS); after that the page signs out rather than look like a stolen token.
   *
   * An answer that arrives after a sign-out belongs to a sign-in that has ended: it is dropped, and the
   * refresh token it carries is revoked, so neither the page nor the server keeps anything of it. */
  function refreshTokens() {
    if (session.refreshing) return session.refreshing;
    if (!session.refreshToken) return Promise.reject(new ApiError(401, "no_refresh_token", "Not signed in."));
    const refreshToken = session.refreshToken;
    const generation = session.generation;
    if (!session.firstUse || session.firstUse.token !== refreshToken) {
      session.firstUse = { token: refreshToken, at: Date.now(), retried: false };
    }
    const pending = apiRequest("POST", "/tokens/refresh", { refresh_token: refreshToken })
      .then((tokens) => {
        if (generation !== session.generation) {
          revokeQuietly(tokens.refresh_token);
          throw new ApiError(401, "signed_out", "Signed out.");
        }
        storeTokens(tokens);
        return tokens;
      }, (err) => {
        if (generation !== session.generation) throw err; // signed out meanwhile: nothing to retry or end
        if (err.status === 0 || err.status >= 500 || err.status === 429) {
          const use = session.firstUse;
          if (use && use.token === refreshToken && !use.retried
              && Date.now() + REFRESH_RETRY_MS - use.at < REFRESH_RETRY_WITHIN_MS) {
            use.retried = true;
            clearTimeout(session.refreshTimer);
            session.refreshTimer = setTimeout(() => refreshTokens().then(sendAuth).catch(() => {}),
              REFRESH_RETRY_MS);
          } else if (session.refreshToken === refreshToken) {
            signOut("Your session could not be renewed — please sign in again.");
          }
        } else if (session.refreshToken === refreshToken) {
          signOut("Your session has ended — please sign in again.", { revoke: false });
        }
        throw err;
      })
      .finally(() => {
        if (session.refreshing === pending) session.refreshing = null; // not a newer sign-in's refresh
      });
    session.refreshing = pending;
    return pending;
  }

  /** A token that is (nearly) expired is refreshed before being sent, e.g. after the laptop slept. */
  async function freshAccessToken() {
    if (!session.accessToken && !session.refreshToken) return null;
    if (!session.accessToken || session.expiresAt - Date.now() < 10000) await refreshTokens();
    return session.accessToken;
  }

  async function loadCurrentUser() {
    const generation = session.generation;
    const me = await apiRequest("GET", "/users/me", undefined, { auth: true });
    if (generation !== session.generation) throw new ApiError(401, "signed_out", "Signed out.");
    dashboard.user = me;
    renderAccount();
    syncOrderSubscription();
    return me;
  }

  function currentRole() {
    return (dashboard.user && dashboard.user.role) || conn.socketRole;
  }

  function isStaff() {
    return Boolean(session.accessToken) && currentRole() === "staff";
  }

  /** Staff watch every order; anyone else signed in watches their own. */
  function ordersChannel() {
    if (!session.accessToken) return null;
    const role = currentRole();
    if (!role) return null;
    return role === "staff" ? "orders" : "orders:mine";
  }

  // ---- sign in / sign out ---------------------------------------------------------------------------

  function showAuthError(message, requestId) {
    ui.authError.textContent = requestId ? message + " (request " + requestId + ")" : message;
    ui.authError.hidden = !message;
  }

  async function handleSignIn(event) {
    event.preventDefault();
    const email = ui.email.value.trim();
    const password = ui.password.value;
    if (!email || !password) {
      showAuthError("Enter your email and password.");
      return;
    }
    ui.signinButton.disabled = true;
    showAuthError("");
    try {
      const tokens = await apiRequest("POST", "/tokens", { email, password });
      storeTokens(tokens);
      ui.password.value = "";
      await loadCurrentUser();
      sendAuth();
    } catch (err) {
      if (!session.accessToken) {
        showAuthError(err.message || "Sign-in failed.", err.requestId);
      } else {
        showAuthError("Signed in, but your profile could not be loaded: " + err.message, err.requestId);
        sendAuth();
      }
    } finally {
      ui.signinButton.disabled = false;
    }
  }

  /** Revokes the login at the server (every refresh token of this sign-in), forgets it here, clears private
   * data and reconnects anonymously (the socket has no "de-auth" op). */
  function signOut(message, { revoke = true } = {}) {
    if (revoke && session.refreshToken) revokeQuietly(session.refreshToken);
    clearSession();
    dashboard.user = null;
    conn.socketRole = null;
    conn.authenticated = false;
    for (const channel of PRIVATE_CHANNELS) {
      delete dashboard.lastSeq[channel];
      delete dashboard.epochs[channel];
      delete dashboard.subscriptions[channel];
      snapshotsSeen.delete(channel);
    }
    clearOrders();
    clearTotals();
    renderAccount();
    showAuthError(message || "");
    reconnectNow();
  }

  /** Ends a login at the server (every refresh token of its family); keepalive: sent even if the tab closes. */
  function revokeQuietly(refreshToken) {
    if (!refreshToken) return;
    fetch(API + "/tokens/revoke", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify({ refresh_token: refreshToken }),
      keepalive: true,
      credentials: "same-origin",
    }).catch(() => { /* the tokens are forgotten here anyway; the refresh token expires on its own */ });
  }

  function renderAccount() {
    const signedIn = Boolean(session.accessToken || session.refreshToken);
    ui.signinForm.hidden = signedIn;
    ui.userPanel.hidden = !signedIn;
    const user = dashboard.user;
    if (user) {
      const name = user.name ? user.name + " <" + user.email + ">" : user.email;
      ui.userInfo.textContent = name + " · " + (user.role || "customer");
    } else {
      ui.userInfo.textContent = signedIn ? "…" : "";
    }
    const role = signedIn ? (currentRole() || "anonymous") : "anonymous";
    if (ui.body.dataset.role !== role) {
      ui.body.dataset.role = role;
      for (const entry of orderItems.values()) renderOrder(entry);
    }
    const channel = ordersChannel();
    if (!signedIn) ui.ordersHint.textContent = "Sign in to see orders.";
    else if (channel === "orders") ui.ordersHint.textContent = "All orders (staff view).";
    else if (channel === "orders:mine") ui.ordersHint.textContent = "Your orders.";
    else ui.ordersHint.textContent = "Loading orders…";
    if (!isStaff()) ui.todayMeta.textContent = "Sign in as staff to see today's sales.";
  }

  // ---- WebSocket: connect, reconnect ----------------------------------------------------------------

  function socketUrl() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    return scheme + "//" + location.host + "/ws";
  }

  function connect() {
    clearTimeout(conn.reconnectTimer);
    clearInterval(conn.countdownTimer);
    if (!("WebSocket" in window)) {
      setState("offline", "offline — this browser has no WebSocket support");
      return;
    }
    if (conn.everLive) {
      setState("reconnecting", "reconnecting (attempt " + Math.max(1, conn.attempts) + ")");
      setDetail("connecting…");
    } else {
      setState("connecting");
    }

    let ws;
    try {
      ws = new WebSocket(socketUrl());
    } catch (err) {
      scheduleReconnect();
      return;
    }
    dashboard.socket = ws;
    dashboard.subscriptions = {};
    conn.sent = {};
    conn.authenticated = false;
    conn.authPending = false;
    conn.authSettled = false;

    // Every handler checks it still belongs to the current socket: a replaced socket must stay silent.
    ws.addEventListener("open", () => {
      if (ws === dashboard.socket) handleOpen(ws);
    });
    ws.addEventListener("message", (event) => {
      if (ws === dashboard.socket) handleFrame(event.data);
    });
    ws.addEventListener("close", (event) => {
      if (ws === dashboard.socket) handleClose(event);
    });
    // "error" is always followed by "close", where the reconnect is scheduled.
  }

  async function handleOpen(ws) {
    if (conn.everLive) {
      // what each channel resumes from, to tell afterwards what was caught up
      const channels = {};
      for (const channel of Object.keys(dashboard.lastSeq)) {
        channels[channel] = { after: dashboard.lastSeq[channel], head: null, caughtUp: 0, done: false, reset: false };
      }
      dashboard.resume = { channels, done: false, at: Date.now() };
      setDetail("resuming…");
    }
    if (!session.accessToken && !session.refreshToken) {
      subscribeAll();
      return;
    }
    try {
      await freshAccessToken();
    } catch (_) { /* refresh failed: carry on anonymously */ }
    if (ws !== dashboard.socket) return;
    if (session.accessToken) sendAuth();
    else subscribeAll();
  }

  function handleClose(event) {
    clearTimeout(conn.authTimer);
    conn.authPending = false;
    conn.authenticated = false;
    dashboard.subscriptions = {};
    dashboard.socket = null;
    // 4008 (too slow), 1001 (going away), 1012 (restart) and network drops all mean the same here: come back.
    scheduleReconnect(event && event.code);
  }

  function scheduleReconnect(closeCode) {
    clearTimeout(conn.reconnectTimer);
    conn.attempts += 1;
    dashboard.attempt = conn.attempts;
    if (navigator.onLine === false) {
      // The "online" event reconnects at once; the slow retry covers browsers that misreport onLine.
      clearInterval(conn.countdownTimer);
      setState("offline", "offline");
      setDetail("waiting for the network");
      conn.reconnectTimer = setTimeout(connect, BACKOFF_MAX_MS);
      return;
    }
    const base = Math.min(BACKOFF_MAX_MS, BACKOFF_START_MS * Math.pow(2, conn.attempts - 1));
    const jittered = Math.round(base * (0.8 + Math.random() * 0.4)); // spread clients after a server restart
    const deadline = Date.now() + jittered;
    showReconnectCountdown(deadline);
    if (closeCode) ui.connState.title = "last close code " + closeCode;
    conn.reconnectTimer = setTimeout(connect, jittered);
  }

  /** Drops the current socket on purpose (sign-out) and opens a fresh one at once. */
  function reconnectNow() {
    const old = dashboard.socket;
    dashboard.socket = null; // silences the old socket's handlers
    if (old && old.readyState <= 1) {
      try { old.close(1000, "reconnect"); } catch (_) { /* ignore */ }
    }
    conn.attempts = 0;
    connect();
  }

  window.addEventListener("online", () => {
    if (!dashboard.socket || dashboard.socket.readyState > WebSocket.OPEN) {
      conn.attempts = 0;
      connect();
    }
  });
  // The browser says the network is gone: a socket that looks open would only find out at its next ping,
  // so close it now; handleClose shows "offline" and the "online" event comes back at once.
  window.addEventListener("offline", () => {
    const ws = dashboard.socket;
    if (ws && ws.readyState <= WebSocket.OPEN) {
      try { ws.close(1000, "offline"); } catch (_) { /* ignore */ }
      handleClose({ code: 1000 });
    } else {
      setState("offline", "offline");
      setDetail("waiting for the network");
    }
  });

  function send(message) {
    const ws = dashboard.socket;
    if (!ws || ws.readyState !== WebSocket.OPEN) return false;
    ws.send(JSON.stringify(message));
    return true;
  }

  // ---- WebSocket: auth and subscriptions ------------------------------------------------------------

  /** Authenticates the socket; subscriptions wait for the reply so private channels are allowed. */
  function sendAuth() {
    if (!session.accessToken) return;
    if (!send({ op: "auth", token: session.accessToken })) return;
    conn.authPending = true;
    clearTimeout(conn.authTimer);
    conn.authTimer = setTimeout(() => {
      conn.authPending = false;
      conn.authSettled = true;
      subscribeAll();
    }, AUTH_REPLY_TIMEOUT_MS);
  }

  function desiredChannels() {
    const channels = PUBLIC_CHANNELS.slice();
    const mine = conn.authenticated ? ordersChannel() : null;
    if (mine) channels.push(mine);
    return channels;
  }

  /** Subscribes to every wanted channel not already (being) subscribed, resuming from the last seq. */
  function subscribeAll() {
    const wanted = desiredChannels();
    for (const channel of wanted) {
      if (!dashboard.subscriptions[channel]) subscribe(channel);
    }
    // A role change (or sign-out) leaves a stale private channel behind: drop it.
    for (const channel of PRIVATE_CHANNELS) {
      if (dashboard.subscriptions[channel] && !wanted.includes(channel)) {
        send({ op: "unsubscribe", channel });
        delete dashboard.subscriptions[channel];
      }
    }
    updateLiveState();
  }

  function subscribe(channel) {
    const message = { op: "subscribe", channel };
    // Without `after` the server sends a snapshot; with it (and the epoch it is a seq of), what we missed.
    if (typeof dashboard.lastSeq[channel] === "number") {
      message.after = dashboard.lastSeq[channel];
      if (dashboard.epochs[channel]) message.epoch = dashboard.epochs[channel];
    }
    if (send(message)) {
      dashboard.subscriptions[channel] = "pending";
      conn.sent[channel] = { after: message.after, epoch: message.epoch };
    }
  }

  function syncOrderSubscription() {
    renderAccount();
    if (conn.authenticated && !conn.authPending) subscribeAll();
    if (isStaff()) refreshTotals();
  }

  /** "live" means: socket open and the inventory channel confirmed. Success resets the backoff. */
  function updateLiveState() {
    const ws = dashboard.socket;
    const open = ws && ws.readyState === WebSocket.OPEN;
    if (open && dashboard.subscriptions.inventory === "active") {
      conn.attempts = 0;
      dashboard.attempt = 0;
      conn.everLive = true;
      ui.connState.removeAttribute("title");
      if (dashboard.state !== "live") setState("live");
      if (!dashboard.resume) setDetail("");
      reportResume();
    }
  }

  // ---- resume bookkeeping: what a reconnect caught up ----------------------------------------------

  function resumeEntry(channel) {
    const resume = dashboard.resume;
    if (!resume || resume.done) return null;
    if (!resume.channels[channel]) {
      resume.channels[channel] = { after: null, head: null, caughtUp: 0, done: false, reset: false };
    }
    return resume.channels[channel];
  }

  /** Once every channel is back and has replayed up to the head it was resumed at, say so. */
  function reportResume() {
    const resume = dashboard.resume;
    if (!resume || resume.done || dashboard.state !== "live") return;
    if ((session.accessToken || session.refreshToken) && !conn.authSettled) return; // private channels pending
    const entries = Object.entries(resume.channels);
    for (const [channel, entry] of entries) {
      if (!dashboard.subscriptions[channel] && desiredChannels().includes(channel)) return; // not back yet
      if (dashboard.subscriptions[channel] && !entry.done) return;
    }
    resume.done = true;
    let caught = 0;
    const reset = [];
    for (const [channel, entry] of entries) {
      caught += entry.caughtUp;
      if (entry.reset) reset.push(channel);
    }
    const text = reset.length
      ? "back live — " + reset.join(", ") + " reloaded (its history was reset); " +
        plural(caught, "event", "events") + " caught up"
      : "back live — resumed where it left off: " + plural(caught, "event", "events") +
        " caught up, none missed";
    setDetail(text);
    dashboard.resume.text = text;
    addFeedNote(text);
  }

  // ---- WebSocket: incoming frames -------------------------------------------------------------------

  function handleFrame(raw) {
    let frame;
    try {
      frame = JSON.parse(raw);
    } catch (_) {
      console.warn("bookshop: ignoring a non-JSON frame");
      return;
    }
    if (!frame || typeof frame !== "object") return;

    switch (frame.type) {
      case "authenticated": return handleAuthenticated(frame);
      case "subscribed": return handleSubscribed(frame);
      case "snapshot": return handleSnapshot(frame);
      case "event": return handleEvent(frame);
      case "error": return handleServerError(frame);
      case "unsubscribed": return undefined;
      default: console.debug("bookshop: unknown frame type", frame.type);
    }
  }

  function handleAuthenticated(frame) {
    clearTimeout(conn.authTimer);
    conn.authPending = false;
    conn.authenticated = true;
    conn.authSettled = true;
    conn.expiredRetries = 0;
    conn.socketRole = frame.role || null;
    renderAccount();
    subscribeAll();
    if (isStaff()) refreshTotals(); // what happened while the socket was away or unauthenticated
  }

  function handleSubscribed(frame) {
    const channel = frame.channel;
    if (!channel) return;
    dashboard.subscriptions[channel] = "active";
    const sent = conn.sent[channel] || {};
    const entry = resumeEntry(channel);
    const resumed = typeof sent.after === "number" && typeof frame.seq === "number" && sent.after <= frame.seq &&
      (!sent.epoch || !frame.epoch || sent.epoch === frame.epoch);
    if (entry) {
      entry.head = frame.seq;
      if (!resumed) entry.reset = typeof sent.after === "number"; // a snapshot follows
      // a filtered channel (orders:mine) may never see the head's seq: its catch-up comes in this burst
      entry.done = resumed && (!FULL_CHANNELS.includes(channel) || dashboard.lastSeq[channel] >= frame.seq);
    }
    if (frame.epoch) dashboard.epochs[channel] = frame.epoch;
    // Only adopt the server's seq when we had none: after a resume it may already point past the
    // events it is about to replay, and taking it would make us drop them as duplicates.
    if (typeof dashboard.lastSeq[channel] !== "number" && typeof frame.seq === "number") {
      dashboard.lastSeq[channel] = frame.seq;
    }
    updateLiveState();
  }

  const snapshotsSeen = new Set(); // channels that had a snapshot on this page (a later one is a reset)

  function handleSnapshot(frame) {
    const channel = frame.channel;
    if (!channel) return;
    dashboard.subscriptions[channel] = "active";
    // A snapshot is authoritative (a first subscribe, another epoch, or an `after` out of the history).
    if (typeof frame.seq === "number") dashboard.lastSeq[channel] = frame.seq;
    if (frame.epoch) dashboard.epochs[channel] = frame.epoch;
    const entry = resumeEntry(channel);
    if (entry) {
      entry.done = true;
      if (typeof entry.after === "number") entry.reset = true;
    } else if (snapshotsSeen.has(channel)) {
      // a live subscription's stream started another history (a restored backup): the server sent it afresh
      addFeedNote(channel + ": the stream's history was reset — reloaded from the server");
      setDetail(channel + " reloaded: its history was reset");
    }
    snapshotsSeen.add(channel);
    const items = (frame.data && Array.isArray(frame.data.items)) ? frame.data.items : [];
    if (channel === "inventory") replaceStock(items);
    else if (channel === "books") replaceBooks(items);
    else if (PRIVATE_CHANNELS.includes(channel)) {
      replaceOrders(items);
      if (channel === "orders") refreshTotals();
    }
    updateLiveState();
  }

  function handleEvent(frame) {
    const channel = frame.channel;
    if (!channel) return;
    const last = dashboard.lastSeq[channel];
    if (typeof frame.seq === "number") {
      if (typeof last === "number" && frame.seq <= last) return; // already applied
      dashboard.lastSeq[channel] = frame.seq;
      const seen = dashboard.received[channel] || (dashboard.received[channel] = []);
      seen.push(frame.seq);
      if (seen.length > MAX_RECEIVED) seen.splice(0, seen.length - MAX_RECEIVED);
    }
    const entry = resumeEntry(channel);
    if (entry && !entry.done) {
      entry.caughtUp += 1;
      if (typeof entry.head === "number" && frame.seq >= entry.head) entry.done = true;
    }
    const data = frame.data || {};
    switch (frame.event) {
      case "stock.changed": {
        const before = stockRows.get(String(data.isbn));
        const previous = before && before.data ? before.data.available : null;
        upsertStock(data, true);
        feedStock(data, previous, frame.at);
        break;
      }
      case "book.created":
      case "book.updated":
        rememberBook(data);
        addFeed((frame.event === "book.created" ? "New book " : "Book updated: ") + bookName(data), frame.at, "book");
        break;
      case "book.deleted":
        addFeed("Book " + bookName(data) + " left sale", frame.at, "book");
        forgetBook(data);
        break;
      case "order.created":
      case "order.status_changed":
        upsertOrder(data, frame.at, true);
        addFeed(orderSentence(frame.event, data), frame.at, "order");
        if (channel === "orders") refreshTotals();
        break;
      default: console.debug("bookshop: unknown event", frame.event);
    }
    if (entry && entry.done) reportResume();
  }

  function handleServerError(frame) {
    const code = frame.code || "error";
    if (code === "token_expired" || (conn.authPending && /token|auth/.test(code))) {
      handleExpiredToken();
      return;
    }
    if (conn.authPending) {
      // Auth refused for another reason: stay anonymous but keep the public channels flowing.
      clearTimeout(conn.authTimer);
      conn.authPending = false;
      conn.authSettled = true;
      subscribeAll();
    }
    if (frame.channel && dashboard.subscriptions[frame.channel]) {
      // The subscription was refused, or ended because the service behind it went away ("unavailable"):
      // in that case try again shortly, resuming from the last seq.
      delete dashboard.subscriptions[frame.channel];
      if (frame.channel === "inventory" && dashboard.state === "live") {
        setState("reconnecting", "reconnecting (stock unavailable)");
      }
      if (code === "unavailable") {
        clearTimeout(conn.resubscribeTimer);
        conn.resubscribeTimer = setTimeout(subscribeAll, RESUBSCRIBE_MS);
      }
    }
    console.warn("bookshop: server error", code, frame.message || "");
  }

  /** The server ended our private subscriptions: refresh, re-auth, and resume them from the last seq. */
  async function handleExpiredToken() {
    clearTimeout(conn.authTimer);
    conn.authPending = false;
    conn.authenticated = false;
    for (const channel of PRIVATE_CHANNELS) delete dashboard.subscriptions[channel];
    subscribeAll(); // public channels are unaffected, but make sure they are there
    if (!session.refreshToken) return;
    conn.expiredRetries += 1;
    if (conn.expiredRetries > 3) {
      signOut("The server keeps rejecting your session — please sign in again.");
      return;
    }
    try {
      await refreshTokens();
      sendAuth(); // the "authenticated" reply re-subscribes with after = last seq
    } catch (_) { /* refreshTokens signs out or retries on its own */ }
  }

  // ---- the feed: latest events in plain words -------------------------------------------------------

  function addFeed(text, at, kind) {
    const item = el("li", kind ? "feed-" + kind : "");
    const time = formatTime(at || new Date().toISOString());
    const stamp = el("time", null, time.text);
    if (time.iso) stamp.setAttribute("datetime", time.iso);
    item.append(stamp, el("span", "feed-text", text));
    ui.feed.insertBefore(item, ui.feed.firstChild);
    while (ui.feed.children.length > MAX_FEED) ui.feed.lastElementChild.remove();
  }

  function addFeedNote(text) {
    addFeed(text, null, "note");
    ui.feed.firstChild.classList.add("note");
  }

  const REASONS = {
    cancelled_by_request: "on request",
    payment_declined: "payment declined",
    out_of_stock: "out of stock",
    reservation_expired: "reservation expired",
  };

  function orderSentence(event, data) {
    const status = String(data.status || "").toLowerCase();
    const verb = event === "order.created" ? "placed" : (status || "changed");
    const copies = orderCopies(data);
    let text = "Order " + shortId(data.id) + " " + verb;
    if (data.reason && verb === "cancelled") text += " (" + (REASONS[data.reason] || String(data.reason).replace(/_/g, " ")) + ")";
    const parts = [];
    if (copies !== null) parts.push(plural(copies, "book", "books"));
    const money = formatMoney(data.total_cents, data.currency);
    if (money) parts.push(money);
    return parts.length ? text + " — " + parts.join(", ") : text;
  }

  function bookName(data) {
    const title = typeof data.title === "string" && data.title ? data.title : titleCache.get(String(data.isbn));
    return title ? "“" + title + "”" : "ISBN " + String(data.isbn);
  }

  function feedStock(data, previous, at) {
    const level = normaliseStock(data);
    let text = "Stock of " + bookName(data) + ": " + level.available + " available";
    if (typeof previous === "number" && previous !== level.available) {
      const delta = level.available - previous;
      text += " (" + (delta > 0 ? "+" : "−") + Math.abs(delta) + ")";
    }
    addFeed(text, at, "stock");
  }

  // ---- tiles and chart: today's totals (staff) ------------------------------------------------------

  const totals = {
    inFlight: null,
    again: false,
    lastRead: 0,           // when the last read started
    gapTimer: null,
    midnightTimer: null,
    minuteTimer: null,
    clockSkew: 0,          // server time − our time, from the last answer
    chart: null,           // {from: ms of the first minute, counts: [60]}
  };

  /** Reads today's totals a moment after an event (TOTALS_SETTLE_MS, so the events of one order make one
   * read), at most once every TOTALS_GAP_MS; an event while a read is in flight asks for one more after it.
   * A burst of orders costs a read a second, and the last read always comes after the last event. */
  function refreshTotals() {
    if (!isStaff() || totals.gapTimer) return;
    if (totals.inFlight) {
      totals.again = true;
      return;
    }
    const wait = Math.max(TOTALS_SETTLE_MS, totals.lastRead + TOTALS_GAP_MS - Date.now());
    totals.gapTimer = setTimeout(() => {
      totals.gapTimer = null;
      readTotals();
    }, wait);
  }

  function readTotals() {
    if (!isStaff()) return;
    totals.lastRead = Date.now();
    totals.inFlight = apiRequest("GET", "/orders/summary", undefined, { auth: true })
      .then(renderTotals)
      .catch((err) => {
        if (err.status === 403 || err.status === 401) return;
        ui.todayMeta.textContent = "Today's totals are unavailable (" + err.message + "); they update with the next order.";
      })
      .finally(() => {
        totals.inFlight = null;
        if (totals.again) {
          totals.again = false;
          refreshTotals();
        }
      });
  }

  function setTile(node, text) {
    if (node.textContent !== text) {
      const first = node.textContent === "—";
      node.textContent = text;
      if (!first) flash(node.parentNode);
    }
  }

  function renderTotals(body) {
    if (!body || !isStaff()) return;
    dashboard.totals = body;
    dashboard.totalsReads += 1;
    setTile(ui.tiles.confirmed, String(body.orders_confirmed));
    setTile(ui.tiles.revenue, formatMoney(body.revenue_cents, body.currency));
    setTile(ui.tiles.cancellations, String(body.cancellations));
    setTile(ui.tiles.open, String(body.open_orders));
    ui.todayMeta.textContent = "Today, " + body.date + " (" + body.timezone + "): " +
      plural(body.orders_shipped, "order", "orders") + " shipped. Figures move with every order event.";
    const asOf = Date.parse(body.as_of);
    if (!Number.isNaN(asOf)) totals.clockSkew = asOf - Date.now();
    const chart = body.confirmed_per_minute || {};
    const from = Date.parse(chart.from);
    if (!Number.isNaN(from) && Array.isArray(chart.counts)) totals.chart = { from, counts: chart.counts.map(Number) };
    renderChart();
    // a new day starts the tiles again at local midnight (the shop's, which the server knows)
    clearTimeout(totals.midnightTimer);
    const until = Date.parse(body.until);
    if (!Number.isNaN(until)) {
      const wait = Math.min(until - (Date.now() + totals.clockSkew) + 1000, 2147483000);
      totals.midnightTimer = setTimeout(refreshTotals, Math.max(1000, wait));
    }
  }

  function clearTotals() {
    clearTimeout(totals.midnightTimer);
    clearTimeout(totals.gapTimer);
    totals.gapTimer = null;
    dashboard.totals = null;
    totals.chart = null;
    for (const key of ["confirmed", "revenue", "cancellations", "open"]) ui.tiles[key].textContent = "—";
    renderChart();
  }

  /** Bars of the last 60 minutes, the current one last; the axis moves on with the clock. */
  function renderChart() {
    clearTimeout(totals.minuteTimer);
    ui.chartBars.replaceChildren();
    ui.chartGrid.replaceChildren();
    if (!totals.chart) {
      ui.chartDesc.textContent = isStaff() ? "Loading…" : "Sign in as staff to see the orders of the last hour.";
      ui.chartMeta.textContent = isStaff() ? "" : "staff only";
      return;
    }
    const now = Date.now() + totals.clockSkew;
    const current = Math.floor(now / 60000) * 60000;
    const first = current - (CHART_MINUTES - 1) * 60000;
    const counts = [];
    for (let i = 0; i < CHART_MINUTES; i += 1) {
      const index = Math.round((first + i * 60000 - totals.chart.from) / 60000);
      counts.push(index >= 0 && index < totals.chart.counts.length ? totals.chart.counts[index] : 0);
    }
    const top = Math.max(3, ...counts);
    const width = 600 / CHART_MINUTES;
    for (const fraction of [0.5, 1]) {
      const y = 160 - fraction * 150;
      ui.chartGrid.append(svg("line", { x1: 0, x2: 600, y1: y, y2: y }));
    }
    counts.forEach((count, i) => {
      if (!count) return;
      const height = (count / top) * 150;
      const bar = svg("rect", { x: i * width + 1, y: 160 - height, width: width - 2, height,
        "data-minute": new Date(first + i * 60000).toISOString(), "data-count": count });
      if (i === CHART_MINUTES - 1) bar.setAttribute("class", "now");
      const tip = svg("title");
      tip.textContent = new Date(first + i * 60000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }) +
        ": " + plural(count, "order", "orders");
      bar.append(tip);
      ui.chartBars.append(bar);
    });
    const total = counts.reduce((a, b) => a + b, 0);
    ui.chartBars.dataset.total = String(total);
    ui.chartDesc.textContent = plural(total, "order", "orders") + " confirmed in the last hour, at most " +
      Math.max(...counts) + " in one minute.";
    ui.chartMeta.textContent = plural(total, "order", "orders") + " in the last hour · scale up to " + top + "/min";
    totals.minuteTimer = setTimeout(renderChart, 60000 - (now % 60000) + 50);
  }

  // ---- stock table ----------------------------------------------------------------------------------

  const stockRows = new Map(); // isbn -> { row, cells, data }
  const sort = { key: "isbn", dir: 1 };

  function toCount(value) {
    const n = Number(value);
    return Number.isFinite(n) ? n : 0;
  }

  function normaliseStock(data) {
    const onHand = toCount(data.on_hand);
    const reserved = toCount(data.reserved);
    const available = data.available === undefined || data.available === null
      ? onHand - reserved : toCount(data.available);
    return { isbn: String(data.isbn), on_hand: onHand, reserved, available };
  }

  function createStockRow(isbn) {
    const row = el("tr");
    row.dataset.isbn = isbn;
    const cells = {
      isbn: el("td", "isbn", isbn),
      title: el("td", "title"),
      on_hand: el("td", "num"),
      reserved: el("td", "num"),
      available: el("td", "num available"),
      restock: el("td", "restock staff-only"),
    };
    for (const key of Object.keys(cells)) {
      cells[key].dataset.col = key;
      row.appendChild(cells[key]);
    }
    // restock in place (staff): a quantity and a button; Enter in the box sends it too
    const input = el("input");
    input.type = "number";
    input.min = "1";
    input.max = "100000";
    input.step = "1";
    input.placeholder = "qty";
    input.setAttribute("aria-label", "Copies to add to " + isbn);
    const button = el("button", "small", "Add");
    button.type = "button";
    const error = el("span", "row-error");
    error.setAttribute("role", "alert");
    cells.restock.append(input, button, error);
    const entry = { row, cells, data: null, input, button, error };
    button.addEventListener("click", () => restock(entry));
    input.addEventListener("keydown", (e) => {
      if (e.key === "Enter") restock(entry);
    });
    return entry;
  }

  async function restock(entry) {
    const isbn = entry.row.dataset.isbn;
    const quantity = Number(entry.input.value);
    entry.error.textContent = "";
    if (!Number.isInteger(quantity) || quantity < 1 || quantity > 100000) {
      entry.error.textContent = "a whole number from 1";
      return;
    }
    entry.button.disabled = true;
    try {
      const level = await apiRequest("POST", "/inventory/" + encodeURIComponent(isbn) + "/restock", { quantity },
        { auth: true });
      entry.input.value = "";
      upsertStock(level, true); // every other browser flashes it on the stock.changed event
    } catch (err) {
      entry.error.textContent = err.message || "restock failed";
    } finally {
      entry.button.disabled = false;
    }
  }

  function sortValue(entry, key) {
    if (key === "isbn") return entry.row.dataset.isbn;
    if (key === "title") return (titleCache.get(entry.row.dataset.isbn) || "\uffff").toLowerCase();
    return entry.data ? entry.data[key] : 0;
  }

  function compareRows(a, b) {
    const x = sortValue(a, sort.key);
    const y = sortValue(b, sort.key);
    if (x < y) return -sort.dir;
    if (x > y) return sort.dir;
    return a.row.dataset.isbn < b.row.dataset.isbn ? -1 : (a.row.dataset.isbn > b.row.dataset.isbn ? 1 : 0);
  }

  /** Puts one row where the sort says (rows only move when their sort value changed). */
  function placeRow(entry) {
    let before = null;
    for (const child of ui.stockBody.children) {
      if (child !== entry.row && compareRows(entry, stockRows.get(child.dataset.isbn)) < 0) {
        before = child;
        break;
      }
    }
    if (entry.row.nextSibling !== before || entry.row.parentNode !== ui.stockBody) ui.stockBody.insertBefore(entry.row, before);
  }

  function resortAll() {
    const entries = Array.from(stockRows.values()).sort(compareRows);
    const fragment = document.createDocumentFragment();
    for (const entry of entries) fragment.appendChild(entry.row);
    ui.stockBody.appendChild(fragment);
  }

  function upsertStock(raw, animate, batch) {
    if (!raw || raw.isbn === undefined || raw.isbn === null) return;
    const data = normaliseStock(raw);
    let entry = stockRows.get(data.isbn);
    const isNew = !entry;
    if (isNew) {
      entry = createStockRow(data.isbn);
      stockRows.set(data.isbn, entry);
      renderTitle(entry);
      observeRow(entry.row);
    }
    const previous = entry.data;
    const changed = !previous || previous.on_hand !== data.on_hand ||
      previous.reserved !== data.reserved || previous.available !== data.available;
    entry.data = data;
    entry.cells.on_hand.textContent = String(data.on_hand);
    entry.cells.reserved.textContent = String(data.reserved);
    entry.cells.available.textContent = String(data.available);
    const low = data.available <= LOW_STOCK;
    entry.row.classList.toggle("low", low);
    entry.cells.available.title = low ? "Low stock" : "";
    applyFilter(entry);
    if (!batch && (isNew || (changed && sort.key !== "isbn" && sort.key !== "title"))) placeRow(entry);
    if (animate && changed) flash(entry.row);
    if (!batch) scheduleStockSummary();
  }

  /** A snapshot replaces the table: rows not in it go, changed rows flash so the jump is visible. */
  function replaceStock(items) {
    const seen = new Set();
    const hadRows = stockRows.size > 0;
    for (const item of items) {
      if (!item || item.isbn === undefined) continue;
      seen.add(String(item.isbn));
      upsertStock(item, hadRows, true);
    }
    for (const [isbn, entry] of stockRows) {
      if (!seen.has(isbn)) {
        if (rowObserver) rowObserver.unobserve(entry.row);
        entry.row.remove();
        stockRows.delete(isbn);
      }
    }
    resortAll();
    scheduleStockSummary();
  }

  let summaryFrame = 0;
  function scheduleStockSummary() {
    if (summaryFrame) return;
    summaryFrame = requestAnimationFrame(() => {
      summaryFrame = 0;
      renderStockSummary();
    });
  }

  function renderStockSummary() {
    const low = [];
    for (const entry of stockRows.values()) if (entry.data && entry.data.available <= LOW_STOCK) low.push(entry);
    ui.stockEmpty.hidden = stockRows.size > 0;
    ui.stockSummary.textContent = stockRows.size
      ? stockRows.size + " ISBNs · " + low.length + " low · updated " + new Date().toLocaleTimeString()
      : "";
    const count = String(low.length);
    if (ui.tiles.low.textContent !== count) {
      const first = ui.tiles.low.textContent === "—";
      ui.tiles.low.textContent = count;
      if (!first) flash(ui.tiles.low.parentNode);
    }
    low.sort((a, b) => a.data.available - b.data.available || (a.row.dataset.isbn < b.row.dataset.isbn ? -1 : 1));
    const items = low.slice(0, 4).map((entry) => {
      const title = titleCache.get(entry.row.dataset.isbn) || entry.row.dataset.isbn;
      return el("li", null, title + " (" + entry.data.available + ")");
    });
    ui.lowList.replaceChildren(...items);
  }

  // Filter box: matches ISBN or known title, case-insensitively.
  let filterText = "";
  function applyFilter(entry) {
    if (!filterText) {
      entry.row.hidden = false;
      return;
    }
    const title = titleCache.get(entry.row.dataset.isbn) || "";
    const haystack = (entry.row.dataset.isbn + " " + title).toLowerCase();
    entry.row.hidden = !haystack.includes(filterText);
  }

  ui.stockFilter.addEventListener("input", () => {
    filterText = ui.stockFilter.value.trim().toLowerCase();
    for (const entry of stockRows.values()) applyFilter(entry);
  });

  // Column headers sort: a click on the current column turns the order round.
  for (const th of ui.stockTable.querySelectorAll("th[data-sort]")) {
    th.querySelector("button").addEventListener("click", () => {
      const key = th.dataset.sort;
      sort.dir = sort.key === key ? -sort.dir : (key === "isbn" || key === "title" ? 1 : -1);
      sort.key = key;
      for (const other of ui.stockTable.querySelectorAll("th[data-sort]")) other.removeAttribute("aria-sort");
      th.setAttribute("aria-sort", sort.dir > 0 ? "ascending" : "descending");
      resortAll();
    });
  }

  // ---- titles: books channel + lazy, rate-limited lookups -------------------------------------------

  const titleCache = new Map();   // isbn -> title string, or null when the book is known not to exist
  const titleFailedAt = new Map(); // isbn -> time of a failed lookup, to avoid hammering the API
  const titleQueue = [];
  const titleQueued = new Set();
  let titleInFlight = 0;
  let titleTimer = null;

  function renderTitle(entry) {
    const isbn = entry.row.dataset.isbn;
    const cell = entry.cells.title;
    if (titleCache.has(isbn)) {
      const title = titleCache.get(isbn);
      cell.textContent = title || "—";
      cell.classList.toggle("unknown", !title);
    } else {
      cell.textContent = "…";
      cell.classList.add("unknown");
    }
    applyFilter(entry);
  }

  function setTitle(isbn, title) {
    const before = titleCache.get(isbn);
    titleCache.set(isbn, title);
    const entry = stockRows.get(isbn);
    if (entry) {
      renderTitle(entry);
      if (sort.key === "title" && before !== title && entry.row.parentNode) placeRow(entry);
      if (entry.data && entry.data.available <= LOW_STOCK) scheduleStockSummary();
    }
  }

  function rememberBook(book) {
    if (book && book.isbn !== undefined && book.isbn !== null) {
      setTitle(String(book.isbn), typeof book.title === "string" ? book.title : null);
    }
  }

  function forgetBook(book) {
    if (book && book.isbn !== undefined && book.isbn !== null) setTitle(String(book.isbn), null);
  }

  function replaceBooks(items) {
    for (const book of items) rememberBook(book);
  }

  // Only rows scrolled into view ask for their title, so a big catalogue doesn't trigger a fetch storm.
  const rowObserver = "IntersectionObserver" in window
    ? new IntersectionObserver((entries) => {
      for (const item of entries) if (item.isIntersecting) requestTitle(item.target.dataset.isbn);
    })
    : null;

  function observeRow(row) {
    if (rowObserver) rowObserver.observe(row);
    else requestTitle(row.dataset.isbn);
  }

  function requestTitle(isbn) {
    if (!isbn || titleCache.has(isbn) || titleQueued.has(isbn)) return;
    const failed = titleFailedAt.get(isbn);
    if (failed && Date.now() - failed < TITLE_RETRY_AFTER_MS) return;
    titleQueued.add(isbn);
    titleQueue.push(isbn);
    clearTimeout(titleTimer);
    titleTimer = setTimeout(pumpTitleQueue, TITLE_FETCH_DELAY_MS);
  }

  function pumpTitleQueue() {
    while (titleInFlight < TITLE_FETCH_CONCURRENCY && titleQueue.length) {
      const isbn = titleQueue.shift();
      if (titleCache.has(isbn) || !stockRows.has(isbn)) {
        titleQueued.delete(isbn); // the books channel got there first, or the row is gone
        continue;
      }
      titleInFlight += 1;
      fetchTitle(isbn).finally(() => {
        titleInFlight -= 1;
        titleQueued.delete(isbn);
        pumpTitleQueue();
      });
    }
  }

  async function fetchTitle(isbn) {
    try {
      // Books are public: no token, so a lookup can never trigger a refresh or a sign-out.
      const book = await apiRequest("GET", "/books/" + encodeURIComponent(isbn));
      if (!titleCache.has(isbn)) rememberBook(Object.assign({ isbn }, book));
    } catch (err) {
      if (err.status === 404) setTitle(isbn, null);
      else titleFailedAt.set(isbn, Date.now());
    }
  }

  // ---- orders: the staff's all, a customer's own; ship and cancel in place --------------------------

  const orderItems = new Map(); // order id -> { item, parts, data }

  function orderCopies(data) {
    if (Array.isArray(data.items)) return data.items.reduce((n, line) => n + toCount(line.quantity), 0);
    if (data.items !== undefined && data.items !== null && Number.isFinite(Number(data.items))) return Number(data.items);
    if (Array.isArray(data.lines)) return data.lines.reduce((n, line) => n + toCount(line.quantity), 0);
    return null;
  }

  function normaliseOrder(data) {
    const out = {
      id: String(data.id),
      user_id: data.user_id,
      status: data.status,
      total_cents: data.total_cents,
      currency: data.currency,
      created_at: data.created_at,
    };
    const copies = orderCopies(data);
    if (copies !== null) out.copies = copies;
    if (Array.isArray(data.history) && data.history.length) out.updated_at = data.history[data.history.length - 1].at;
    if (data.reason) out.reason = data.reason;
    return out;
  }

  const STATUS_RANK = { PENDING: 0, CONFIRMED: 1, SHIPPED: 2, CANCELLED: 2 };

  function createOrderItem(id) {
    const item = el("li", "order");
    item.dataset.orderId = id;
    const parts = {
      id: el("span", "order-id", "Order " + shortId(id)),
      status: el("span", "status"),
      total: el("span", "order-total"),
      time: el("time", "order-time"),
      actions: el("span", "order-actions"),
      error: el("p", "order-error"),
    };
    parts.id.title = id;
    parts.error.setAttribute("role", "alert");
    parts.error.hidden = true;
    item.append(parts.id, parts.status, parts.total, parts.time, parts.actions, parts.error);
    return { item, parts, data: {} };
  }

  function renderOrder(entry, at) {
    const data = entry.data;
    entry.item.dataset.status = data.status || "";
    entry.parts.status.textContent = data.status || "unknown";
    entry.parts.status.className = "status status-" + String(data.status || "unknown").toLowerCase().replace(/[^a-z]/g, "");
    const copies = typeof data.copies === "number" ? plural(data.copies, "book", "books") + " · " : "";
    entry.parts.total.textContent = copies + formatMoney(data.total_cents, data.currency);
    const time = formatTime(at || data.updated_at || data.created_at);
    entry.parts.time.textContent = time.text;
    if (time.iso) entry.parts.time.setAttribute("datetime", time.iso);
    else entry.parts.time.removeAttribute("datetime");
    renderOrderActions(entry);
  }

  function renderOrderActions(entry) {
    const status = entry.data.status;
    const buttons = [];
    const staff = isStaff();
    const own = dashboard.user && entry.data.user_id === dashboard.user.id;
    if (staff && status === "CONFIRMED") buttons.push(actionButton(entry, "ship", "Ship", ""));
    if ((staff || own) && (status === "PENDING" || status === "CONFIRMED")) {
      buttons.push(actionButton(entry, "cancel", "Cancel", "danger"));
    }
    entry.parts.actions.replaceChildren(...buttons);
  }

  function actionButton(entry, action, label, extraClass) {
    const button = el("button", "small " + extraClass, label);
    button.type = "button";
    button.dataset.action = action;
    button.setAttribute("aria-label", label + " order " + entry.data.id);
    button.addEventListener("click", () => {
      // cancelling refunds and restocks: it asks for a second click
      if (action === "cancel" && button.dataset.armed !== "1") {
        button.dataset.armed = "1";
        button.textContent = "Confirm cancel";
        setTimeout(() => {
          if (button.isConnected) {
            button.dataset.armed = "";
            button.textContent = label;
          }
        }, CONFIRM_CANCEL_MS);
        return;
      }
      orderAction(entry, action, button);
    });
    return button;
  }

  async function orderAction(entry, action, button) {
    button.disabled = true;
    entry.parts.error.hidden = true;
    try {
      const order = await apiRequest("POST", "/orders/" + encodeURIComponent(entry.data.id) + "/" + action, {},
        { auth: true });
      upsertOrder(order, null, true, false);
    } catch (err) {
      entry.parts.error.textContent = (action === "ship" ? "Could not ship: " : "Could not cancel: ") + err.message;
      entry.parts.error.hidden = false;
      button.disabled = false;
    }
  }

  /** New or changed orders go to the top of the list; a stale status (an answer after a newer event) is
   * not taken back. The list never grows past MAX_ORDERS. */
  function upsertOrder(raw, at, animate, toTop = true) {
    if (!raw || raw.id === undefined || raw.id === null) return;
    const data = normaliseOrder(raw);
    let entry = orderItems.get(data.id);
    if (!entry) {
      entry = createOrderItem(data.id);
      orderItems.set(data.id, entry);
    }
    const known = entry.data.status;
    if (known && STATUS_RANK[data.status] < STATUS_RANK[known]) return;
    if (known === data.status && !animate) return;
    const changed = known !== data.status;
    entry.data = Object.assign({}, entry.data, data);
    renderOrder(entry, at);
    if ((animate && toTop && changed) || !entry.item.parentNode) ui.orderList.insertBefore(entry.item, ui.orderList.firstChild);
    if (animate && changed) flash(entry.item);
    trimOrders();
  }

  function trimOrders() {
    while (ui.orderList.children.length > MAX_ORDERS) {
      const last = ui.orderList.lastElementChild;
      orderItems.delete(last.dataset.orderId);
      last.remove();
    }
  }

  function orderTime(order) {
    const t = Date.parse(order.created_at || "");
    return Number.isNaN(t) ? 0 : t;
  }

  function replaceOrders(items) {
    clearOrders();
    const sorted = items.filter((o) => o && o.id !== undefined)
      .sort((a, b) => orderTime(b) - orderTime(a))
      .slice(0, MAX_ORDERS);
    for (const order of sorted) {
      const entry = createOrderItem(String(order.id));
      entry.data = normaliseOrder(order);
      orderItems.set(entry.data.id, entry);
      renderOrder(entry);
      ui.orderList.appendChild(entry.item);
    }
  }

  function clearOrders() {
    orderItems.clear();
    ui.orderList.replaceChildren();
  }

  // ---- start-up -------------------------------------------------------------------------------------

  ui.signinForm.addEventListener("submit", handleSignIn);
  ui.signoutButton.addEventListener("click", () => signOut());

  function start() {
    renderStockSummary();
    renderChart();
    const saved = savedRefreshToken();
    try { sessionStorage.removeItem("bookshop.session"); } catch (_) { /* an earlier version's entry */ }
    if (saved) {
      // a reload: the access token was in memory only, so the saved refresh token gets a new pair
      session.refreshToken = saved;
      renderAccount();
      refreshTokens()
        .then(loadCurrentUser)
        .then(() => sendAuth())
        .catch(() => { /* refreshTokens signs out when the login has ended */ });
    } else {
      renderAccount();
    }
    connect();
  }

  start();
})();
