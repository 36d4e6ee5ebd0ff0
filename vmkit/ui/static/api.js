// The JSON API, same origin: the session cookie authenticates; every change echoes the CSRF cookie.

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

let unauthorized = () => {};
export function onUnauthorized(fn) { unauthorized = fn; }

export function csrfToken() {
  const m = document.cookie.match(/(?:^|;\s*)vmkit_csrf=([^;]*)/);
  return m ? decodeURIComponent(m[1]) : "";
}

export async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET") headers["X-CSRF-Token"] = csrfToken();
  let res;
  try {
    res = await fetch(path, {
      method, headers, credentials: "same-origin",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (e) {
    throw new ApiError(0, `cannot reach the vmkit daemon (${e.message})`);
  }
  if (res.status === 204) return null;
  let data = null;
  try { data = await res.json(); } catch { /* not JSON */ }
  if (!res.ok) {
    const message = (data && data.error) || `HTTP ${res.status} ${res.statusText}`;
    if (res.status === 401 && !(path === "/v1/session" && method === "POST")) unauthorized();
    throw new ApiError(res.status, message);
  }
  return data;
}

export const get = (path) => api("GET", path);
export const post = (path, body) => api("POST", path, body);
export const del = (path) => api("DELETE", path);
export const vmPath = (name, action = "") => `/v1/vms/${encodeURIComponent(name)}${action ? "/" + action : ""}`;
