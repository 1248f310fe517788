"""Line plots as PNG files with Pillow alone (it comes with diffusers): the curves that docs/ shows."""
import itertools


def line_plot(path, panels):
    """A PNG of stacked line plots with Pillow alone. panels: [(title, xs, {name: ys or (xs, ys)}, {name: level})],
    one coloured line per series (on the panel's xs, or its own) and a dashed line per level."""
    from PIL import Image, ImageDraw
    W, H, pad = 640, 300, 40
    img = Image.new("RGB", (W, H * len(panels)), "white")
    d = ImageDraw.Draw(img)
    for k, (title, xs, series, levels) in enumerate(panels):
        levels = {name: v for name, v in levels.items() if v == v}  # not NaN
        series = {name: v if isinstance(v, tuple) else (xs, v) for name, v in series.items()}
        xs = sorted({x for v, _ in series.values() for x in v})
        top = 1.1 * max(max(max(ys) for _, ys in series.values()), *levels.values()) or 1
        X = lambda x: pad + (W - 2 * pad) * x / max(xs)
        Y = lambda y: k * H + H - pad - (H - 2 * pad) * y / top
        d.rectangle([pad, k * H + pad, W - pad, k * H + H - pad], outline="black")
        for y in (0, top / 2, top):
            d.text((5, Y(y) - 5), f"{y:.1f}", fill="black")
        d.text((W // 2 - 40, k * H + H - pad + 10), f"training step (0..{max(xs)})", fill="black")
        d.text((pad, k * H + 10), title, fill="black")
        colours = itertools.cycle(["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f",
                        "#bcbd22", "#17becf", "#000000", "#aec7e8", "#98df8a", "#ff9896"])
        for i, (name, ys) in enumerate([*series.items(), *levels.items()]):  # a series' ys: (its xs, its ys)
            c = next(colours)
            if name in series:
                d.line([(X(x), Y(y)) for x, y in zip(*ys)], fill=c, width=2)
            else:
                for x0 in range(pad, W - pad, 12):
                    d.line([(x0, Y(ys)), (x0 + 6, Y(ys))], fill=c, width=2)
            d.text((W - pad - 260, k * H + pad + 8 + 14 * i), name, fill=c)
    img.save(path)
