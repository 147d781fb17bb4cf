/* The HTML report's viewer (inlined into the page by report.py): a before/after split (bicubic
   left, SR right), zoom (wheel, +/-) and pan (drag), the views (whole frame, 1:1 crops) and the
   overlay toggles. With ?selftest in the URL it checks itself once the page has loaded (every
   picture decoded, the split follows the slider and a drag, zoom and pan move the pictures,
   nothing fetched from a network) and writes the result as JSON into #selftest. */
(function () {
  "use strict";
  var ZMAX = 16;

  function viewer(root) {
    var vp = root.querySelector(".vp");
    var after = vp.querySelector(".layer.after");
    var canvases = vp.querySelectorAll(".canvas");
    var frame = vp.querySelector(".frame");
    var divider = vp.querySelector(".divider");
    var split = root.querySelector("input.split");
    var zl = root.querySelector(".zl");
    var views = JSON.parse(root.dataset.views);
    var lr = JSON.parse(root.dataset.lr);
    var st = { z: 1, x: 0, y: 0, s: 50 };

    function draw() {
      var r = vp.getBoundingClientRect();
      st.z = Math.min(ZMAX, Math.max(1, st.z));
      // the picture always covers the viewport: no panning past its edges
      st.x = Math.min(0, Math.max(r.width * (1 - st.z), st.x));
      st.y = Math.min(0, Math.max(r.height * (1 - st.z), st.y));
      st.s = Math.min(100, Math.max(0, st.s));
      var t = "translate(" + st.x + "px, " + st.y + "px) scale(" + st.z + ")";
      canvases.forEach(function (c) { c.style.transform = t; });
      after.style.clipPath = "inset(0 0 0 " + st.s + "%)";
      divider.style.left = st.s + "%";
      split.value = st.s;
      zl.textContent = Math.round(st.z * 100) + "%";
    }
    function zoomAt(f, px, py) {
      var z = Math.min(ZMAX, Math.max(1, st.z * f));
      st.x = px - (px - st.x) * z / st.z;
      st.y = py - (py - st.y) * z / st.z;
      st.z = z;
      draw();
    }
    function pct(clientX) {
      var r = vp.getBoundingClientRect();
      return (100 * (clientX - r.left)) / r.width;
    }
    function show(k) {
      var win = views[k].win, w = win[2], h = win[3];
      vp.querySelectorAll("img[data-view]").forEach(function (img) {
        img.hidden = +img.dataset.view !== k;
      });
      vp.style.aspectRatio = w + " / " + h;
      vp.style.width = "min(100%, calc(75vh * " + (w / h).toFixed(5) + "))";
      // the overlays live in LR pixels: place the whole frame so that the view's window fills
      // the viewport (percentages of the viewport, so no pixel sizes are needed)
      frame.style.left = (-100 * win[0]) / w + "%";
      frame.style.top = (-100 * win[1]) / h + "%";
      frame.style.width = (100 * lr[0]) / w + "%";
      frame.style.height = (100 * lr[1]) / h + "%";
      root.querySelectorAll("button[data-view]").forEach(function (b) {
        b.classList.toggle("on", +b.dataset.view === k);
      });
      st.z = 1;
      st.x = st.y = 0;
      draw();
    }

    split.addEventListener("input", function () { st.s = +split.value; draw(); });
    // a drag on the white line moves the split; elsewhere it pans, and a click puts the split there
    vp.addEventListener("pointerdown", function (e) {
      if (e.button !== 0) return;
      e.preventDefault();
      vp.focus({ preventScroll: true });
      var onLine = !!e.target.closest(".divider");
      var x0 = e.clientX, y0 = e.clientY, sx = st.x, sy = st.y, moved = false;
      vp.classList.add("drag");
      function move(ev) {
        if (onLine) {
          st.s = pct(ev.clientX);
        } else {
          moved = moved || Math.abs(ev.clientX - x0) + Math.abs(ev.clientY - y0) > 3;
          st.x = sx + ev.clientX - x0;
          st.y = sy + ev.clientY - y0;
        }
        draw();
      }
      function up(ev) {
        window.removeEventListener("pointermove", move);
        window.removeEventListener("pointerup", up);
        vp.classList.remove("drag");
        if (!onLine && !moved) { st.s = pct(ev.clientX); draw(); }
      }
      window.addEventListener("pointermove", move);
      window.addEventListener("pointerup", up);
    });
    vp.addEventListener("wheel", function (e) {
      e.preventDefault();
      var r = vp.getBoundingClientRect();
      zoomAt(Math.exp(-e.deltaY * 0.002), e.clientX - r.left, e.clientY - r.top);
    }, { passive: false });
    vp.addEventListener("dblclick", function () { st.z = 1; draw(); });
    vp.addEventListener("keydown", function (e) {
      var r = vp.getBoundingClientRect();
      if (e.key === "ArrowLeft" || e.key === "ArrowRight") {
        st.s += e.key === "ArrowLeft" ? -2 : 2;
        draw();
      } else if (e.key === "+" || e.key === "=" || e.key === "-") {
        zoomAt(e.key === "-" ? 0.5 : 2, r.width / 2, r.height / 2);
      } else if (e.key === "0") {
        st.z = 1;
        draw();
      } else {
        return;
      }
      e.preventDefault();
    });
    root.querySelectorAll("button[data-zoom]").forEach(function (b) {
      b.addEventListener("click", function () {
        var r = vp.getBoundingClientRect();
        if (b.dataset.zoom === "fit") { st.z = 1; draw(); return; }
        zoomAt(b.dataset.zoom === "in" ? 2 : 0.5, r.width / 2, r.height / 2);
      });
    });
    root.querySelectorAll("button[data-view]").forEach(function (b) {
      b.addEventListener("click", function () { show(+b.dataset.view); });
    });
    root.querySelectorAll("input[data-ov]").forEach(function (box) {
      function sync() {
        vp.querySelectorAll(".ov-" + box.dataset.ov).forEach(function (el) {
          el.toggleAttribute("hidden", !box.checked); // an <svg> has no .hidden property
        });
      }
      box.addEventListener("change", sync);
      sync();
    });
    window.addEventListener("resize", draw);
    show(0);
    return { vp: vp, after: after, split: split, divider: divider, canvas: canvases[0], root: root };
  }

  var viewers = [];
  document.querySelectorAll(".viewer").forEach(function (root) { viewers.push(viewer(root)); });

  function selftest() {
    var out = { images: 0, broken: [], external: [], fetched: [], blocked: window.__blocked || [],
      viewers: viewers.length, pairs: document.querySelectorAll("section.pair").length };
    document.querySelectorAll("img").forEach(function (img) {
      out.images += 1;
      if (!img.complete || !(img.naturalWidth > 0)) out.broken.push(img.alt || img.className);
    });
    // any URL with a scheme other than data: or file: (relative links have none)
    document.querySelectorAll("[src], [href]").forEach(function (el) {
      var u = el.getAttribute("src") || el.getAttribute("href") || "";
      if (/^[a-z][a-z0-9+.-]*:/i.test(u) && !/^(data|file):/i.test(u)) out.external.push(u);
    });
    performance.getEntriesByType("resource").forEach(function (e) {
      if (!/^(data|file):/i.test(e.name)) out.fetched.push(e.name);
    });
    var v = viewers[0];
    if (v) {
      var r = v.vp.getBoundingClientRect(), cy = r.top + r.height / 2;
      var clip = function () { return v.after.style.clipPath; };
      var rec = { width: r.width, height: r.height };
      var c0 = clip();
      v.split.value = 20;
      v.split.dispatchEvent(new Event("input", { bubbles: true }));
      rec.slider = [c0, clip()];
      var d = v.divider.getBoundingClientRect(), c1 = clip();
      var at = function (x, y) { return { bubbles: true, button: 0, clientX: x, clientY: y }; };
      v.divider.dispatchEvent(new PointerEvent("pointerdown", at(d.left + d.width / 2, cy)));
      window.dispatchEvent(new PointerEvent("pointermove", at(r.left + 0.75 * r.width, cy)));
      window.dispatchEvent(new PointerEvent("pointerup", at(r.left + 0.75 * r.width, cy)));
      rec.drag = [c1, clip()];
      var t0 = v.canvas.style.transform;
      v.vp.dispatchEvent(new WheelEvent("wheel", { bubbles: true, cancelable: true, deltaY: -400,
        clientX: r.left + r.width / 2, clientY: cy }));
      var t1 = v.canvas.style.transform;
      rec.zoom = [t0, t1];
      var layer = v.vp.querySelector(".layer.after");
      layer.dispatchEvent(new PointerEvent("pointerdown", at(r.left + r.width / 2, cy)));
      window.dispatchEvent(new PointerEvent("pointermove", at(r.left + r.width / 2 + 40, cy + 30)));
      window.dispatchEvent(new PointerEvent("pointerup", at(r.left + r.width / 2 + 40, cy + 30)));
      rec.pan = [t1, v.canvas.style.transform];
      var box = v.root.querySelector("input[data-ov]:not(:checked)");
      if (box) {
        var shown = function () {
          return !v.vp.querySelector(".ov-" + box.dataset.ov).hasAttribute("hidden");
        };
        var before = shown();
        box.click();
        rec.toggle = [box.dataset.ov, before, shown()];
      }
      out.viewer = rec;
    }
    document.getElementById("selftest").textContent = JSON.stringify(out);
  }
  if (/[?&]selftest\b/.test(location.search)) window.addEventListener("load", selftest);
})();
