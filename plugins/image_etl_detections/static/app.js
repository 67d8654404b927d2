// The Detections page: plain DOM + SVG/canvas, no libraries, nothing from the internet.
// Every URL is relative ("?view=...", "api/..."): the page lives under the api-server's
// base_url, at <base>/detections/, and is shown in the Airflow UI's iframe.
// Text from the database only ever goes into textContent, never into HTML.
"use strict";

(() => {
  const DAG_ID = "nightly_detections";
  const PALETTE = ["#1c7ed6", "#f08c00", "#7048e8", "#0ca678", "#d6336c", "#5c940d",
                   "#e8590c", "#1098ad", "#ae3ec9", "#495057"];
  const PAGE = 100;
  const main = document.getElementById("main");
  const crumbs = document.getElementById("crumbs");
  const params = new URLSearchParams(location.search);

  // --- small helpers -------------------------------------------------------------------

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "text") node.textContent = value;
      else if (key === "onclick" || key === "onchange") node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  }

  function svg(tag, attrs = {}, ...children) {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
    for (const child of children.flat()) if (child) node.append(child);
    return node;
  }

  function query(values) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(values)) if (v !== undefined && v !== null && v !== "") q.set(k, v);
    return "?" + q.toString();
  }

  function link(text, values, attrs = {}) {
    return el("a", {href: query(values), ...attrs}, text);
  }

  function go(values) {
    location.search = query(values);
  }

  async function api(path, values = {}) {
    const response = await fetch("api/" + path + query(values),
                                 {credentials: "same-origin", headers: {Accept: "application/json"}});
    if (!response.ok) {
      let detail = `${response.status} ${response.statusText}`;
      try { detail = (await response.json()).detail || detail; } catch (e) { /* not JSON */ }
      throw new Error(detail);
    }
    return response.json();
  }

  const fmt = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"));
  const conf = (c) => (c === null || c === undefined ? "–" : Number(c).toFixed(3));

  // A class's colour is its position in the model's class list, i.e. its class id.
  function colorOf(classes, name) {
    const i = classes.indexOf(name);
    return PALETTE[(i < 0 ? classes.length : i) % PALETTE.length];
  }
  const colorOfId = (classId) => PALETTE[classId % PALETTE.length];

  function setCrumbs(...parts) {
    crumbs.replaceChildren(...parts.flatMap((p, i) => (i ? [el("span", {class: "sep", text: "›"}), p] : [p])));
  }

  function show(...nodes) {
    main.replaceChildren(...nodes.filter((n) => n !== null && n !== undefined));
    document.body.dataset.ready = "1";  // the e2e test waits for this
  }

  function card(key, value, field) {
    return el("div", {class: "card"}, el("div", {class: "v", "data-field": field, text: fmt(value)}),
              el("div", {class: "k", text: key}));
  }

  function cell(value, field, cls = "num") {
    return el("td", {class: cls, "data-field": field, text: typeof value === "number" ? fmt(value) : value});
  }

  function modelName(models, sha) {
    const m = models.find((x) => x.sha256 === sha);
    return m ? m.name : sha.slice(0, 12);
  }

  // --- charts (hand-made SVG) ------------------------------------------------------------

  // Stacked bars, one per night: series = [{name, color, values: [...]}].
  function barChart(title, days, series, id) {
    const W = 900, H = 230, left = 52, bottom = 34, top = 10, right = 8;
    const totals = days.map((_, i) => series.reduce((s, x) => s + (x.values[i] || 0), 0));
    const max = Math.max(1, ...totals);
    const slot = (W - left - right) / Math.max(1, days.length);
    const bar = Math.max(2, Math.min(36, slot * 0.7));
    const y = (v) => top + (H - top - bottom) * (1 - v / max);
    const parts = [];
    for (const t of [0, 0.5, 1]) {
      const v = Math.round(max * t);
      parts.push(svg("line", {x1: left, x2: W - right, y1: y(v), y2: y(v), stroke: "#e3e7ee"}),
                 svg("text", {x: left - 6, y: y(v) + 4, "text-anchor": "end"}, fmt(v)));
    }
    const every = Math.max(1, Math.ceil(days.length / 12));
    days.forEach((day, i) => {
      let base = 0;
      const x = left + slot * i + (slot - bar) / 2;
      for (const s of series) {
        const v = s.values[i] || 0;
        if (v > 0) {
          parts.push(svg("rect", {x, y: y(base + v), width: bar, height: y(base) - y(base + v),
                                  fill: s.color, "data-day": day, "data-series": s.name, "data-value": v},
                         svg("title", {}, `${day} · ${s.name}: ${fmt(v)}`)));
        }
        base += v;
      }
      if (i % every === 0) {
        parts.push(svg("text", {x: x + bar / 2, y: H - bottom + 16, "text-anchor": "middle"}, day.slice(5)));
      }
    });
    const legend = el("div", {class: "legend"}, series.map((s) =>
      el("span", {}, el("span", {class: "swatch", "data-color": s.color}), s.name)));
    for (const sw of legend.querySelectorAll(".swatch")) sw.style.background = sw.dataset.color;
    return el("div", {class: "chart", id},
              el("h3", {text: title}),
              svg("svg", {viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title}, parts),
              legend);
  }

  // --- views ------------------------------------------------------------------------------

  async function nightsView() {
    const {models} = await api("models");
    setCrumbs(el("span", {text: "Nights"}));
    if (!models.length) {
      return show(el("p", {class: "muted",
        text: `No results yet: the ${DAG_ID} DAG has not loaded any night into the results database.`}));
    }
    const model = params.get("model") || models[0].sha256;
    const count = Number(params.get("nights") || 30);
    const data = await api("nights", {model, nights: count});
    const days = data.nights.map((n) => n.date);
    const classes = data.classes;

    const modelSelect = el("select", {id: "model", onchange: (e) => go({view: "nights", model: e.target.value, nights: count})},
      models.map((m) => el("option", {value: m.sha256, selected: m.sha256 === model,
                                      text: `${m.name} (${m.sha256.slice(0, 8)}…, ${m.nights} nights)`})));
    const nightsSelect = el("select", {id: "nights", onchange: (e) => go({view: "nights", model, nights: e.target.value})},
      [7, 14, 30, 90, 366].map((n) => el("option", {value: n, selected: n === count, text: `last ${n}`})));
    const note = params.get("dag_id") && params.get("dag_id") !== DAG_ID
      ? el("p", {class: "muted", text: `Only the ${DAG_ID} DAG records detections; these are its nights.`}) : null;

    const charts = el("div", {class: "charts"},
      barChart("Images per night", days, [
        {name: "ok", color: "#2f9e44", values: data.nights.map((n) => n.ok)},
        {name: "failed", color: "#e03131", values: data.nights.map((n) => n.failed)},
      ], "chart-images"),
      barChart("Detections per class per night", days, classes.map((c) => (
        {name: c, color: colorOf(classes, c), values: data.nights.map((n) => n.per_class[c] || 0)})),
      "chart-classes"));

    const head = el("tr", {}, el("th", {text: "Drop date"}), el("th", {class: "num", text: "Images"}),
      el("th", {class: "num", text: "OK"}), el("th", {class: "num", text: "Failed"}),
      el("th", {class: "num", text: "Detections"}),
      classes.map((c) => el("th", {class: "num", text: c})), el("th", {text: ""}));
    const rows = [...data.nights].reverse().map((n) => el("tr", {"data-date": n.date},
      el("td", {}, link(n.date, {view: "night", model, date: n.date})),
      cell(n.images, "images"), cell(n.ok, "ok"),
      el("td", {class: n.failed ? "num failed" : "num", "data-field": "failed", text: fmt(n.failed)}),
      cell(n.detections, "detections"),
      classes.map((c) => cell(n.per_class[c] || 0, `class:${c}`)),
      el("td", {}, link("images", {view: "night", model, date: n.date}), " · ",
         n.failed ? link("failures", {view: "failures", model, date: n.date}) : el("span", {class: "muted", text: "no failures"}))));
    show(note,
         el("div", {class: "controls"}, el("label", {for: "model", text: "Model"}), modelSelect,
            el("label", {for: "nights", text: "Nights"}), nightsSelect),
         charts,
         el("h2", {text: `${days.length} night${days.length === 1 ? "" : "s"} of ${modelName(models, model)}`}),
         el("table", {id: "nights-table"}, el("thead", {}, head), el("tbody", {}, rows)));
  }

  function imageTable(list, classes, back) {
    const head = el("tr", {}, el("th", {class: "num", text: "#"}), el("th", {text: "Image"}),
      back.showDate ? el("th", {text: "Drop date"}) : null, el("th", {text: "Status"}),
      el("th", {class: "num", text: "Detections"}), el("th", {class: "num", text: "Best confidence"}));
    const rows = list.images.map((im, k) => el("tr", {"data-image-id": im.id},
      el("td", {class: "num", text: fmt(list.offset + k + 1)}),
      el("td", {}, link(im.rel_path, {view: "image", id: im.id, ...back.query})),
      back.showDate ? el("td", {text: im.date}) : null,
      el("td", {class: im.status === "failed" ? "failed" : "", text: im.status}),
      cell(im.detections, "detections"), cell(conf(im.best_confidence), "best", "num")));
    return el("table", {id: "images-table"}, el("thead", {}, head), el("tbody", {}, rows));
  }

  function filters(classes, current, onApply) {
    const cls = el("select", {id: "class"}, el("option", {value: "", text: "all classes"}),
      classes.map((c) => el("option", {value: c, selected: c === current.class_name, text: c})));
    const minConf = el("input", {id: "min-conf", type: "number", min: 0, max: 1, step: 0.05,
                                 value: current.min_conf || "", placeholder: "0.00"});
    const apply = el("button", {type: "button", text: "Apply", onclick: () => onApply(cls.value, minConf.value)});
    return el("div", {class: "controls"}, el("label", {for: "class", text: "Class"}), cls,
              el("label", {for: "min-conf", text: "Min confidence"}), minConf, apply);
  }

  function pager(list, values) {
    const offset = list.offset;
    const prev = offset > 0 ? link("‹ previous", {...values, offset: Math.max(0, offset - PAGE)}) : null;
    const next = offset + list.images.length < list.total ? link("next ›", {...values, offset: offset + PAGE}) : null;
    const shown = list.total ? `${fmt(offset + 1)}–${fmt(offset + list.images.length)} of ${fmt(list.total)}` : "none";
    return el("div", {class: "pager"}, prev, el("span", {class: "muted", text: shown}), next);
  }

  async function nightView() {
    const model = params.get("model"), date = params.get("date");
    const flt = {class_name: params.get("class_name") || "", min_conf: params.get("min_conf") || ""};
    const offset = Number(params.get("offset") || 0);
    const [{models}, totals] = await Promise.all([api("models"), api("night", {model, date})]);
    const list = await api("images", {model, date, ...flt, limit: PAGE, offset});
    setCrumbs(link("Nights", {view: "nights", model}), el("span", {text: modelName(models, model)}),
              el("span", {text: date}));
    const back = {query: {model, date}};
    show(el("div", {class: "cards", id: "night-cards"}, card("images", totals.images, "images"),
            card("ok", totals.ok, "ok"), card("failed", totals.failed, "failed"),
            card("detections", totals.detections, "detections"),
            totals.classes.map((c) => card(c, totals.per_class[c], `class:${c}`))),
         totals.failed ? el("p", {}, link(`${fmt(totals.failed)} failed image(s) and their reasons`,
                                         {view: "failures", model, date})) : null,
         nightFiles(totals.files),
         el("h2", {text: flt.class_name || flt.min_conf
           ? "Images with matching detections, most first" : "Images by detection count, most first"}),
         filters(totals.classes, flt, (c, m) => go({view: "night", model, date, class_name: c, min_conf: m})),
         imageTable(list, totals.classes, back),
         pager(list, {view: "night", model, date, ...flt}));
  }

  // Every file of the night, as the run's report counts them (the last listing of the folder).
  function nightFiles(f) {
    if (!f) return null;
    const row = (key, value, field, extra) => el("tr", {},
      el("th", {text: key}), cell(value, field), el("td", {class: "muted", text: extra || ""}));
    const settings = (s) => s.settings ? Object.entries(s.settings).sort()
      .map(([k, v]) => `${k}=${v === null ? "model" : v}`).join(" ") : "not recorded (loaded before settings were)";
    return el("section", {id: "night-files"},
      el("h2", {text: "Every file of the night"}),
      el("table", {id: "night-files-table"}, el("tbody", {},
        row("listed", f.listed, "listed", f.checked_at
          ? `last listed ${f.checked_at.replace("T", " ").slice(0, 19)} UTC by run ${f.checked_by_run}` : "never listed since revision 0003"),
        row("loaded ok", f.ok, "files-ok"),
        row("failed", f.failed, "files-failed"),
        row("caught up after the night's run", f.caught_up, "caught-up", "late files loaded by a later night's run"),
        row("still being written", f.unsettled, "unsettled", (f.unsettled_names || []).join(", ")),
        row("skipped: links", f.skipped_links, "skipped-links"),
        row("skipped: other extensions", f.skipped_unknown, "skipped-unknown"),
        row("skipped: hidden", f.skipped_hidden, "skipped-hidden"))),
      f.mixed_settings ? el("p", {class: "failed", "data-field": "mixed-settings",
                              text: "This night mixes result settings:"}) : null,
      el("ul", {id: "result-settings"}, f.settings.map((s) => el("li", {"data-key": s.result_key || ""},
        `${fmt(s.images)} image(s): ${settings(s)}`))));
  }

  async function failuresView() {
    const model = params.get("model"), date = params.get("date");
    const offset = Number(params.get("offset") || 0);
    const [{models}, list] = await Promise.all([api("models"), api("failures", {model, date, limit: PAGE, offset})]);
    setCrumbs(link("Nights", {view: "nights", model}), el("span", {text: modelName(models, model)}),
              link(date, {view: "night", model, date}), el("span", {text: "failures"}));
    const rows = list.failures.map((f) => el("tr", {"data-image-id": f.id},
      el("td", {}, link(f.rel_path, {view: "image", id: f.id, model, date})),
      el("td", {class: "failed", "data-field": "error", text: f.error || "(no reason recorded)"}),
      el("td", {}, link(f.run_id, {view: "run", run_id: f.run_id})),
      el("td", {class: "muted", text: (f.processed_at || "").replace("T", " ").slice(0, 19)})));
    show(el("h2", {text: `${fmt(list.total)} failed image${list.total === 1 ? "" : "s"} on ${date}`}),
         el("table", {id: "failures-table"},
            el("thead", {}, el("tr", {}, el("th", {text: "Image"}), el("th", {text: "Reason"}),
                                 el("th", {text: "Airflow run"}), el("th", {text: "Processed (UTC)"}))),
            el("tbody", {}, rows)),
         pager({offset, total: list.total, images: list.failures}, {view: "failures", model, date}));
  }

  async function runView() {
    const runId = params.get("run_id");
    const dagId = params.get("dag_id");
    setCrumbs(link("Nights", {view: "nights"}), el("span", {text: `run ${runId || ""}`}));
    if (dagId && dagId !== DAG_ID) {
      return show(el("p", {class: "muted", text: `Only the ${DAG_ID} DAG records detections; ${dagId} has none.`}));
    }
    const flt = {class_name: params.get("class_name") || "", min_conf: params.get("min_conf") || ""};
    const offset = Number(params.get("offset") || 0);
    let run;
    try {
      run = await api("run", {run_id: runId});
    } catch (e) {
      return show(el("p", {class: "muted", text: `This run has loaded nothing into the results database yet (${e.message}).`}));
    }
    const classes = run.classes;
    const list = await api("images", {run_id: runId, ...flt, limit: PAGE, offset});
    const head = el("tr", {}, el("th", {text: "Drop date"}), el("th", {class: "num", text: "Images"}),
      el("th", {class: "num", text: "OK"}), el("th", {class: "num", text: "Failed"}),
      el("th", {class: "num", text: "Detections"}), classes.map((c) => el("th", {class: "num", text: c})));
    const rows = run.nights.map((n) => el("tr", {"data-date": n.date},
      el("td", {}, link(n.date, {view: "night", model: n.model, date: n.date})),
      cell(n.images, "images"), cell(n.ok, "ok"),
      el("td", {class: n.failed ? "num failed" : "num", "data-field": "failed"},
         n.failed ? link(fmt(n.failed), {view: "failures", model: n.model, date: n.date}) : "0"),
      cell(n.detections, "detections"), classes.map((c) => cell(n.per_class[c] || 0, `class:${c}`))));
    const load = run.last_load;
    show(el("h2", {text: `Airflow run ${run.run_id}`}),
         load ? el("p", {class: "muted", text: `Last load: ${fmt(load.images)} images (${fmt(load.failed)} failed), ` +
           `${fmt(load.detections)} detections for ${load.drop_date}, at ${(load.loaded_at || "").replace("T", " ").slice(0, 19)} UTC` +
           (load.images_per_s ? `, ${load.images_per_s.toFixed(1)} images/s` : "")}) : null,
         el("table", {id: "run-table"}, el("thead", {}, head), el("tbody", {}, rows)),
         el("h2", {text: "The images this run wrote, most detections first"}),
         filters(classes, flt, (c, m) => go({view: "run", run_id: runId, dag_id: dagId, class_name: c, min_conf: m})),
         imageTable(list, classes, {query: {run_id: runId}, showDate: run.nights.length > 1}),
         pager(list, {view: "run", run_id: runId, dag_id: dagId, ...flt}));
  }

  // --- the image viewer ----------------------------------------------------------------------

  async function imageView() {
    const id = params.get("id");
    const image = await api(`images/${encodeURIComponent(id)}`);
    setCrumbs(link("Nights", {view: "nights", model: image.model}), el("span", {text: image.model_name || image.model.slice(0, 12)}),
              link(image.date, {view: "night", model: image.model, date: image.date}),
              el("span", {text: image.rel_path}));
    const strip = el("canvas", {id: "thumb", "data-boxes": 0});
    const zoom = el("canvas", {id: "zoom"});
    const zoomNote = el("p", {class: "hint muted", text: "Click the image (or a detection) to see that region at full resolution."});
    const minConf = el("input", {id: "box-conf", type: "number", min: 0, max: 1, step: 0.05, value: 0});
    const fit = el("input", {id: "fit", type: "checkbox", checked: true});
    const rows = image.detections.map((d) => el("tr", {class: "clickable", "data-det": d.det_index},
      el("td", {class: "num", text: d.det_index}),
      el("td", {}, el("span", {class: "swatch", "data-color": colorOfId(d.class_id)}), d.class_name),
      el("td", {class: "num", text: conf(d.confidence)}),
      el("td", {class: "num muted", text: `${Math.round(d.x1)}, ${Math.round(d.y1)} – ${Math.round(d.x2)}, ${Math.round(d.y2)}`})));
    const table = el("table", {id: "detections-table"},
      el("thead", {}, el("tr", {}, el("th", {class: "num", text: "#"}), el("th", {text: "Class"}),
                             el("th", {class: "num", text: "Confidence"}), el("th", {class: "num", text: "Box (px)"}))),
      el("tbody", {}, rows));
    for (const sw of table.querySelectorAll(".swatch")) sw.style.background = sw.dataset.color;
    const facts = el("p", {class: "muted", text: `${image.width ?? "?"} × ${image.height ?? "?"} px · ` +
      `${fmt(image.bytes)} bytes · status ${image.status} · ${image.detections.length} detection(s) · run `},
      link(image.run_id, {view: "run", run_id: image.run_id}));
    const error = image.error ? el("p", {class: "error", text: `Failed: ${image.error}`}) : null;
    const stripBox = el("div", {class: "strip"}, strip);
    show(el("h2", {text: image.rel_path}), facts, error,
         el("div", {class: "controls"}, el("label", {for: "box-conf", text: "Hide boxes below confidence"}), minConf,
            el("label", {for: "fit", text: "Fit to height"}), fit),
         el("div", {class: "viewer"}, stripBox,
            el("div", {class: "zoom"}, el("h3", {text: "Full resolution"}), zoomNote, zoom, table)));

    const thumb = await loadThumbnail(id, stripBox);
    if (!thumb) return;
    const width = image.width || thumb.naturalWidth, height = image.height || thumb.naturalHeight;
    const scale = {x: thumb.naturalWidth / width, y: thumb.naturalHeight / height};
    let region = null;  // the zoomed box, in image pixels

    const visible = () => image.detections.filter((d) => d.confidence >= Number(minConf.value || 0));
    function drawStrip() {
      strip.width = thumb.naturalWidth;
      strip.height = thumb.naturalHeight;
      const ctx = strip.getContext("2d");
      ctx.drawImage(thumb, 0, 0);
      ctx.lineWidth = 2;
      const boxes = visible();
      for (const d of boxes) {
        ctx.strokeStyle = colorOfId(d.class_id);
        ctx.strokeRect(d.x1 * scale.x, d.y1 * scale.y, Math.max(1, (d.x2 - d.x1) * scale.x),
                       Math.max(1, (d.y2 - d.y1) * scale.y));
      }
      if (region) {
        ctx.setLineDash([5, 3]);
        ctx.strokeStyle = "#ffffff";
        ctx.strokeRect(region.x * scale.x, region.y * scale.y, region.w * scale.x, region.h * scale.y);
        ctx.setLineDash([]);
      }
      strip.dataset.boxes = boxes.length;
      strip.dataset.loaded = "1";
      strip.style.height = fit.checked ? "calc(100vh - 15rem)" : "";
    }

    async function zoomTo(cx, cy, size) {
      size = Math.round(Math.min(1024, Math.max(128, size)));
      const w = Math.min(size, width), h = Math.min(size, height);
      const x = Math.round(Math.min(Math.max(0, cx - w / 2), width - w));
      const y = Math.round(Math.min(Math.max(0, cy - h / 2), height - h));
      const response = await fetch(`api/images/${encodeURIComponent(id)}/region` + query({x, y, w, h}),
                                   {credentials: "same-origin"});
      if (!response.ok) {
        zoomNote.textContent = `Region unavailable: ${response.status}`;
        return;
      }
      const [rx, ry, rw, rh] = (response.headers.get("X-Region") || `${x},${y},${w},${h}`).split(",").map(Number);
      const bitmap = await createImageBitmap(await response.blob());
      region = {x: rx, y: ry, w: rw, h: rh};
      zoom.width = bitmap.width;
      zoom.height = bitmap.height;
      const ctx = zoom.getContext("2d");
      ctx.drawImage(bitmap, 0, 0);
      ctx.lineWidth = 2;
      ctx.font = "13px system-ui, sans-serif";
      let shown = 0;
      for (const d of visible()) {
        if (d.x2 < rx || d.y2 < ry || d.x1 > rx + rw || d.y1 > ry + rh) continue;
        const color = colorOfId(d.class_id);
        ctx.strokeStyle = color;
        ctx.strokeRect(d.x1 - rx, d.y1 - ry, d.x2 - d.x1, d.y2 - d.y1);
        const label = `${d.class_name} ${conf(d.confidence)}`;
        ctx.fillStyle = color;
        ctx.fillRect(d.x1 - rx, Math.max(0, d.y1 - ry - 17), ctx.measureText(label).width + 8, 17);
        ctx.fillStyle = "#ffffff";
        ctx.fillText(label, d.x1 - rx + 4, Math.max(13, d.y1 - ry - 4));
        shown += 1;
      }
      zoom.dataset.region = `${rx},${ry},${rw},${rh}`;
      zoom.dataset.boxes = shown;
      zoomNote.textContent = `Region x ${rx}–${rx + rw}, y ${ry}–${ry + rh} at 1:1 (${shown} box${shown === 1 ? "" : "es"}).`;
      drawStrip();
    }

    const zoomOn = (d) => zoomTo((d.x1 + d.x2) / 2, (d.y1 + d.y2) / 2, Math.max(256, Math.max(d.x2 - d.x1, d.y2 - d.y1) * 1.8));
    strip.addEventListener("click", (e) => {
      const r = strip.getBoundingClientRect();
      const px = (e.clientX - r.left) * (strip.width / r.width), py = (e.clientY - r.top) * (strip.height / r.height);
      zoomTo(px / scale.x, py / scale.y, 512);
    });
    for (const row of rows) {
      row.addEventListener("click", () => {
        for (const other of rows) other.classList.toggle("selected", other === row);
        zoomOn(image.detections.find((d) => String(d.det_index) === row.dataset.det));
      });
    }
    minConf.addEventListener("change", () => (region ? zoomTo(region.x + region.w / 2, region.y + region.h / 2, Math.max(region.w, region.h)) : drawStrip()));
    fit.addEventListener("change", drawStrip);
    drawStrip();
    const best = [...image.detections].sort((a, b) => b.confidence - a.confidence)[0];
    if (best) {
      rows[image.detections.indexOf(best)].classList.add("selected");
      await zoomOn(best);
    }
  }

  async function loadThumbnail(id, box) {
    const img = new Image();
    img.src = `api/images/${encodeURIComponent(id)}/thumbnail`;
    try {
      await img.decode();
      return img;
    } catch (e) {
      const response = await fetch(img.src, {credentials: "same-origin"});
      let detail = `${response.status}`;
      try { detail = (await response.json()).detail || detail; } catch (err) { /* not JSON */ }
      box.replaceChildren(el("p", {class: "error", text: `No picture: ${detail}`}));
      document.body.dataset.thumbnail = "missing";
      return null;
    }
  }

  // --- dispatch -------------------------------------------------------------------------------

  const VIEWS = {nights: nightsView, night: nightView, failures: failuresView, image: imageView, run: runView};
  const view = VIEWS[params.get("view")] || nightsView;
  document.body.dataset.view = VIEWS[params.get("view")] ? params.get("view") : "nights";
  view().catch((err) => show(el("p", {class: "error", text: String(err && err.message ? err.message : err)})));
})();
