// The storefront's only script: calls the shop's JSON API with fetch and keeps the
// session token in memory (never in a cookie), so a recording of it needs the token
// carried from the login response into later requests.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { token: null, product: null, cart: 0 };

function price(cents) {
  return "$" + (cents / 100).toFixed(2);
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (state.token) headers.Authorization = "Bearer " + state.token;
  const init = { method, headers };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const resp = await fetch(path, init);
  const data = await resp.json();
  if (!resp.ok) throw new Error(data.error || "HTTP " + resp.status);
  return data;
}

function show(err) {
  $("#error").textContent = err ? String(err.message || err) : "";
}

async function search(q) {
  const items = await api("GET", "/products?q=" + encodeURIComponent(q));
  const list = $("#results");
  list.replaceChildren();
  for (const p of items) {
    const li = document.createElement("li");
    const b = document.createElement("button");
    b.type = "button";
    b.dataset.id = p.id;
    b.textContent = p.name + " — " + price(p.price_cents);
    b.addEventListener("click", () => open(p.id).catch(show));
    li.append(b);
    list.append(li);
  }
}

async function open(id) {
  const p = await api("GET", "/products/" + id);
  state.product = p;
  $("#product-name").textContent = p.name;
  $("#product-price").textContent = price(p.price_cents);
  const section = $("#product");
  section.dataset.id = p.id;
  section.hidden = false;
}

async function login(user, password) {
  const r = await api("POST", "/login", { user, password });
  state.token = r.token;
  $("#who").textContent = "signed in as " + user;
}

async function addToCart() {
  if (!state.product) throw new Error("pick a product first");
  const r = await api("POST", "/cart", { product: state.product.id, qty: 1 });
  state.cart = r.items;
  $("#cart").textContent = String(r.items);
}

async function checkout() {
  const order = await api("POST", "/checkout");
  const account = await api("GET", "/account");
  state.cart = 0;
  $("#cart").textContent = "0";
  $("#order").textContent =
    "order " + order.order + ": " + order.items + " item(s), " + price(order.total_cents) +
    " (" + account.orders + " order(s) so far)";
  $("#order").dataset.order = order.order;
}

$("#search-form").addEventListener("submit", (e) => {
  e.preventDefault();
  search($("#q").value).then(() => show(null), show);
});
$("#login-form").addEventListener("submit", (e) => {
  e.preventDefault();
  login($("#user").value, $("#password").value).then(() => show(null), show);
});
$("#add").addEventListener("click", () => addToCart().then(() => show(null), show));
$("#checkout").addEventListener("click", () => checkout().then(() => show(null), show));

// The front page shows the first products of the catalogue.
search("").catch(show);
