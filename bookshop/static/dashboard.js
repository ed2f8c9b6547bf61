/* Bookshop — live dashboard.
 *
 * One WebSocket to the gateway carries every live channel. The page is meant to stay open all day, so
 * everything is built around resuming: the last seq of every channel is kept, and after a reconnect (or a
 * token refresh) the client re-authenticates and re-subscribes with `after` = that seq, so nothing is
 * missed or applied twice. Server data only ever reaches the DOM through textContent.
 */
(function () {
  "use strict";

  // ---- constants ------------------------------------------------------------------------------------

  const API = "/api/v1";
  const PUBLIC_CHANNELS = ["inventory", "books"];
  const PRIVATE_CHANNELS = ["orders", "orders:mine"];
  const LOW_STOCK = 5;
  const MAX_ORDERS = 200;
  const BACKOFF_START_MS = 500;
  const BACKOFF_MAX_MS = 10000;
  const AUTH_REPLY_TIMEOUT_MS = 5000;     // don't hold public channels hostage to a silent auth reply
  const RESUBSCRIBE_MS = 2000;            // retry of a channel whose service was unavailable
  const TITLE_FETCH_CONCURRENCY = 3;
  const TITLE_FETCH_DELAY_MS = 300;       // give the books snapshot a chance to fill the cache first
  const TITLE_RETRY_AFTER_MS = 60000;
  const SESSION_KEY = "bookshop.session";

  // ---- state ----------------------------------------------------------------------------------------

  /** What tests (and curious humans in the console) can see. lastSeq is mutated in place, never replaced. */
  const dashboard = {
    lastSeq: {},
    state: "connecting",
    socket: null,
    user: null,
    subscriptions: {},   // channel -> "pending" | "active"
  };
  window.bookshopDashboard = dashboard;

  const session = {
    accessToken: null,
    refreshToken: null,
    expiresAt: 0,          // ms since epoch
    refreshTimer: null,
    refreshing: null,      // the in-flight refresh promise, shared by every caller
  };

  const conn = {
    attempts: 0,           // consecutive failed connections, drives the backoff
    everLive: false,
    reconnectTimer: null,
    countdownTimer: null,
    authPending: false,
    authTimer: null,
    authenticated: false,  // the *socket* is authenticated (not just the HTTP session)
    socketRole: null,
    expiredRetries: 0,     // guards against a refresh/re-auth loop if the server keeps refusing
    resubscribeTimer: null,
  };

  // ---- DOM helpers ----------------------------------------------------------------------------------

  const $ = (id) => document.getElementById(id);

  const ui = {
    connState: $("conn-state"),
    signinForm: $("signin-form"),
    signinButton: $("signin-button"),
    email: $("signin-email"),
    password: $("signin-password"),
    userPanel: $("user-panel"),
    userInfo: $("user-info"),
    signoutButton: $("signout-button"),
    authError: $("auth-error"),
    stockBody: $("stock-body"),
    stockEmpty: $("stock-empty"),
    stockSummary: $("stock-summary"),
    stockFilter: $("stock-filter"),
    orderFeed: $("order-feed"),
    ordersHint: $("orders-hint"),
  };

  /** Creates an element with a class and text; text goes through textContent only. */
  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  /** Restarts a CSS animation class even if it is still running from the previous change. */
  function flash(node) {
    node.classList.remove("flash");
    void node.offsetWidth; // force a reflow so the animation starts again
    node.classList.add("flash");
  }

  document.addEventListener("animationend", (e) => {
    if (e.target.classList) e.target.classList.remove("flash");
  });

  // ---- connection state display --------------------------------------------------------------------

  function setState(state, detail) {
    dashboard.state = state;
    ui.connState.dataset.state = state;
    const labels = {
      connecting: "connecting…",
      live: "live",
      reconnecting: "reconnecting…",
      offline: "offline — waiting for the network",
    };
    ui.connState.textContent = detail || labels[state] || state;
  }

  function showReconnectCountdown(deadline) {
    clearInterval(conn.countdownTimer);
    const tick = () => {
      const seconds = Math.max(1, Math.ceil((deadline - Date.now()) / 1000));
      setState("reconnecting", "reconnecting in " + seconds + "s");
    };
    tick();
    conn.countdownTimer = setInterval(tick, 250);
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
      });
    } catch (err) {
      throw new ApiError(0, "network_error", "Network error: the gateway could not be reached.");
    }

    let payload = null;
    try {
      payload = await response.json();
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
    saveSession();
    scheduleRefresh();
  }

  function saveSession() {
    try {
      sessionStorage.setItem(SESSION_KEY, JSON.stringify({
        accessToken: session.accessToken,
        refreshToken: session.refreshToken,
        expiresAt: session.expiresAt,
      }));
    } catch (_) { /* storage can be disabled; memory is enough */ }
  }

  function loadSession() {
    try {
      const saved = JSON.parse(sessionStorage.getItem(SESSION_KEY) || "null");
      if (saved && saved.refreshToken) {
        session.accessToken = saved.accessToken;
        session.refreshToken = saved.refreshToken;
        session.expiresAt = Number(saved.expiresAt) || 0;
        return true;
      }
    } catch (_) { /* ignore a corrupt entry */ }
    return false;
  }

  function clearSession() {
    clearTimeout(session.refreshTimer);
    session.accessToken = session.refreshToken = null;
    session.expiresAt = 0;
    session.refreshing = null;
    try { sessionStorage.removeItem(SESSION_KEY); } catch (_) { /* ignore */ }
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

  /** One refresh at a time; concurrent callers share the same promise. A refused refresh signs out. */
  function refreshTokens() {
    if (session.refreshing) return session.refreshing;
    if (!session.refreshToken) return Promise.reject(new ApiError(401, "no_refresh_token", "Not signed in."));
    const refreshToken = session.refreshToken;
    session.refreshing = apiRequest("POST", "/tokens/refresh", { refresh_token: refreshToken })
      .then((tokens) => {
        storeTokens(tokens);
        return tokens;
      })
      .catch((err) => {
        if (err.status === 0 || err.status >= 500) {
          // Transient: keep the session and try again shortly rather than dropping the user.
          clearTimeout(session.refreshTimer);
          session.refreshTimer = setTimeout(() => refreshTokens().then(sendAuth).catch(() => {}), 10000);
        } else if (session.refreshToken === refreshToken) {
          signOut("Your session has expired — please sign in again.");
        }
        throw err;
      })
      .finally(() => { session.refreshing = null; });
    return session.refreshing;
  }

  /** A token that is (nearly) expired is refreshed before being sent, e.g. after the laptop slept. */
  async function freshAccessToken() {
    if (!session.accessToken) return null;
    if (session.expiresAt - Date.now() < 10000) await refreshTokens();
    return session.accessToken;
  }

  async function loadCurrentUser() {
    const me = await apiRequest("GET", "/users/me", undefined, { auth: true });
    dashboard.user = me;
    renderAccount();
    syncOrderSubscription();
    return me;
  }

  function currentRole() {
    return (dashboard.user && dashboard.user.role) || conn.socketRole;
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

  /** Forgets the session, clears private data and reconnects anonymously (there is no "de-auth" op). */
  function signOut(message) {
    clearSession();
    dashboard.user = null;
    conn.socketRole = null;
    conn.authenticated = false;
    for (const channel of PRIVATE_CHANNELS) {
      delete dashboard.lastSeq[channel];
      delete dashboard.subscriptions[channel];
    }
    clearOrders();
    renderAccount();
    showAuthError(message || "");
    reconnectNow();
  }

  function renderAccount() {
    const signedIn = Boolean(session.accessToken);
    ui.signinForm.hidden = signedIn;
    ui.userPanel.hidden = !signedIn;
    const user = dashboard.user;
    if (user) {
      const name = user.name ? user.name + " <" + user.email + ">" : user.email;
      ui.userInfo.textContent = name + " · " + (user.role || "customer");
    } else {
      ui.userInfo.textContent = signedIn ? "…" : "";
    }
    const channel = ordersChannel();
    if (!signedIn) ui.ordersHint.textContent = "Sign in to see orders.";
    else if (channel === "orders") ui.ordersHint.textContent = "All orders (staff view).";
    else if (channel === "orders:mine") ui.ordersHint.textContent = "Your orders.";
    else ui.ordersHint.textContent = "Loading orders…";
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
    setState(conn.everLive ? "reconnecting" : "connecting");

    let ws;
    try {
      ws = new WebSocket(socketUrl());
    } catch (err) {
      scheduleReconnect();
      return;
    }
    dashboard.socket = ws;
    dashboard.subscriptions = {};
    conn.authenticated = false;
    conn.authPending = false;

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
    setState(conn.everLive ? "reconnecting" : "connecting",
      (conn.everLive ? "reconnecting" : "connecting") + "… subscribing");
    if (!session.accessToken) {
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
    // 4008 (too slow), 1001 (going away) and network drops all mean the same thing here: come back.
    scheduleReconnect(event && event.code);
  }

  function scheduleReconnect(closeCode) {
    clearTimeout(conn.reconnectTimer);
    if (navigator.onLine === false) {
      // The "online" event reconnects at once; the slow retry covers browsers that misreport onLine.
      clearInterval(conn.countdownTimer);
      setState("offline");
      conn.reconnectTimer = setTimeout(connect, BACKOFF_MAX_MS);
      return;
    }
    const base = Math.min(BACKOFF_MAX_MS, BACKOFF_START_MS * Math.pow(2, conn.attempts));
    const jittered = Math.round(base * (0.8 + Math.random() * 0.4)); // spread clients after a server restart
    conn.attempts += 1;
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
  window.addEventListener("offline", () => {
    if (!dashboard.socket || dashboard.socket.readyState !== WebSocket.OPEN) setState("offline");
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
    // Without `after` the server sends a snapshot; with it, only what we missed.
    if (typeof dashboard.lastSeq[channel] === "number") message.after = dashboard.lastSeq[channel];
    if (send(message)) dashboard.subscriptions[channel] = "pending";
  }

  function syncOrderSubscription() {
    renderAccount();
    if (conn.authenticated && !conn.authPending) subscribeAll();
  }

  /** "live" means: socket open and the inventory channel confirmed. Success resets the backoff. */
  function updateLiveState() {
    const ws = dashboard.socket;
    const open = ws && ws.readyState === WebSocket.OPEN;
    if (open && dashboard.subscriptions.inventory === "active") {
      conn.attempts = 0;
      conn.everLive = true;
      ui.connState.removeAttribute("title");
      if (dashboard.state !== "live") setState("live");
    }
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
      default: console.debug("bookshop: unknown frame type", frame.type);
    }
  }

  function handleAuthenticated(frame) {
    clearTimeout(conn.authTimer);
    conn.authPending = false;
    conn.authenticated = true;
    conn.expiredRetries = 0;
    conn.socketRole = frame.role || null;
    renderAccount();
    subscribeAll();
  }

  function handleSubscribed(frame) {
    const channel = frame.channel;
    if (!channel) return;
    dashboard.subscriptions[channel] = "active";
    // Only adopt the server's seq when we had none: after a resume it may already point past the
    // events it is about to replay, and taking it would make us drop them as duplicates.
    if (typeof dashboard.lastSeq[channel] !== "number" && typeof frame.seq === "number") {
      dashboard.lastSeq[channel] = frame.seq;
    }
    updateLiveState();
  }

  function handleSnapshot(frame) {
    const channel = frame.channel;
    if (!channel) return;
    dashboard.subscriptions[channel] = "active";
    // A snapshot is authoritative (the server judged our `after` too old, or this is the first subscribe).
    if (typeof frame.seq === "number") dashboard.lastSeq[channel] = frame.seq;
    const items = (frame.data && Array.isArray(frame.data.items)) ? frame.data.items : [];
    if (channel === "inventory") replaceStock(items);
    else if (channel === "books") replaceBooks(items);
    else if (PRIVATE_CHANNELS.includes(channel)) replaceOrders(items);
    updateLiveState();
  }

  function handleEvent(frame) {
    const channel = frame.channel;
    if (!channel) return;
    const last = dashboard.lastSeq[channel];
    if (typeof frame.seq === "number") {
      if (typeof last === "number" && frame.seq <= last) return; // already applied
      dashboard.lastSeq[channel] = frame.seq;
    }
    const data = frame.data || {};
    switch (frame.event) {
      case "stock.changed": upsertStock(data, true); break;
      case "book.created":
      case "book.updated": rememberBook(data); break;
      case "book.deleted": forgetBook(data); break;
      case "order.created":
      case "order.status_changed": upsertOrder(data, frame.at, true); break;
      default: console.debug("bookshop: unknown event", frame.event);
    }
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
      subscribeAll();
    }
    if (frame.channel && dashboard.subscriptions[frame.channel]) {
      // The subscription was refused, or ended because the service behind it went away ("unavailable"):
      // in that case try again shortly, resuming from the last seq.
      delete dashboard.subscriptions[frame.channel];
      if (frame.channel === "inventory" && dashboard.state === "live") {
        setState("reconnecting", "reconnecting… stock is unavailable");
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

  // ---- stock table ----------------------------------------------------------------------------------

  const stockRows = new Map(); // isbn -> { row, cells, data }

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
    };
    for (const key of Object.keys(cells)) {
      cells[key].dataset.col = key;
      row.appendChild(cells[key]);
    }
    return { row, cells, data: null };
  }

  /** Keeps the table sorted by ISBN so rows don't jump around as events arrive. */
  function insertSorted(row, isbn) {
    let before = null;
    for (const child of ui.stockBody.children) {
      if (child.dataset.isbn > isbn) { before = child; break; }
    }
    ui.stockBody.insertBefore(row, before);
  }

  function upsertStock(raw, animate) {
    if (!raw || raw.isbn === undefined || raw.isbn === null) return;
    const data = normaliseStock(raw);
    let entry = stockRows.get(data.isbn);
    const isNew = !entry;
    if (isNew) {
      entry = createStockRow(data.isbn);
      stockRows.set(data.isbn, entry);
      insertSorted(entry.row, data.isbn);
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
    if (animate && changed) flash(entry.row);
    if (animate) renderStockSummary();
  }

  /** A snapshot replaces the table: rows not in it go, changed rows flash so the jump is visible. */
  function replaceStock(items) {
    const seen = new Set();
    const hadRows = stockRows.size > 0;
    for (const item of items) {
      if (!item || item.isbn === undefined) continue;
      seen.add(String(item.isbn));
      upsertStock(item, hadRows);
    }
    for (const [isbn, entry] of stockRows) {
      if (!seen.has(isbn)) {
        if (rowObserver) rowObserver.unobserve(entry.row);
        entry.row.remove();
        stockRows.delete(isbn);
      }
    }
    renderStockSummary();
  }

  function renderStockSummary() {
    let low = 0;
    for (const entry of stockRows.values()) if (entry.data && entry.data.available <= LOW_STOCK) low += 1;
    ui.stockEmpty.hidden = stockRows.size > 0;
    ui.stockSummary.textContent = stockRows.size
      ? stockRows.size + " ISBNs · " + low + " low · updated " + new Date().toLocaleTimeString()
      : "";
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
    titleCache.set(isbn, title);
    const entry = stockRows.get(isbn);
    if (entry) renderTitle(entry);
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

  // ---- order feed -----------------------------------------------------------------------------------

  const orderItems = new Map(); // order id -> { item, parts, data }
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

  function statusClass(status) {
    return "status status-" + String(status || "unknown").toLowerCase().replace(/[^a-z0-9_-]/g, "");
  }

  function createOrderItem(id) {
    const item = el("li", "order");
    item.dataset.orderId = id;
    const parts = {
      id: el("span", "order-id", "#" + id),
      status: el("span", "status"),
      total: el("span", "order-total"),
      time: el("time", "order-time"),
    };
    item.append(parts.id, parts.status, parts.total, parts.time);
    return { item, parts, data: {} };
  }

  function renderOrder(entry, at) {
    const data = entry.data;
    entry.parts.status.textContent = data.status || "unknown";
    entry.parts.status.className = statusClass(data.status);
    entry.parts.total.textContent = formatMoney(data.total_cents, data.currency);
    const time = formatTime(at || data.updated_at || data.created_at);
    entry.parts.time.textContent = time.text;
    if (time.iso) entry.parts.time.setAttribute("datetime", time.iso);
    else entry.parts.time.removeAttribute("datetime");
  }

  /** New or changed orders go to the top of the feed; the feed never grows past MAX_ORDERS. */
  function upsertOrder(data, at, animate) {
    if (!data || data.id === undefined || data.id === null) return;
    const id = String(data.id);
    let entry = orderItems.get(id);
    if (!entry) {
      entry = createOrderItem(id);
      orderItems.set(id, entry);
    }
    entry.data = Object.assign({}, entry.data, data); // status events may carry only part of the order
    renderOrder(entry, at);
    if (animate || !entry.item.parentNode) ui.orderFeed.insertBefore(entry.item, ui.orderFeed.firstChild);
    if (animate) flash(entry.item);
    trimOrders();
  }

  function trimOrders() {
    while (ui.orderFeed.children.length > MAX_ORDERS) {
      const last = ui.orderFeed.lastElementChild;
      orderItems.delete(last.dataset.orderId);
      last.remove();
    }
  }

  function orderTime(order) {
    const t = Date.parse(order.updated_at || order.created_at || "");
    return Number.isNaN(t) ? 0 : t;
  }

  function replaceOrders(items) {
    clearOrders();
    const sorted = items.filter((o) => o && o.id !== undefined)
      .sort((a, b) => orderTime(b) - orderTime(a))
      .slice(0, MAX_ORDERS);
    // Appended in newest-first order, matching how live events are prepended.
    for (const order of sorted) {
      const entry = createOrderItem(String(order.id));
      entry.data = Object.assign({}, order);
      orderItems.set(String(order.id), entry);
      renderOrder(entry);
      ui.orderFeed.appendChild(entry.item);
    }
  }

  function clearOrders() {
    orderItems.clear();
    ui.orderFeed.replaceChildren();
  }

  // ---- start-up -------------------------------------------------------------------------------------

  ui.signinForm.addEventListener("submit", handleSignIn);
  ui.signoutButton.addEventListener("click", () => signOut());

  function start() {
    renderStockSummary();
    if (loadSession()) {
      renderAccount();
      scheduleRefresh();
      // Restore who is signed in; the socket's auth waits for a fresh token in handleOpen.
      freshAccessToken()
        .then(loadCurrentUser)
        .catch((err) => {
          if (err && err.status === 401 && session.accessToken) signOut("Your session has expired — please sign in again.");
        });
    } else {
      renderAccount();
    }
    connect();
  }

  start();
})();
