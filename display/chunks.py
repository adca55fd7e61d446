"""
What decode.py --viz and --viz-html show: the output cut into the chunks each forward pass
committed, each coloured by its size (in the terminal, or as an HTML page).
"""
import html

COLOURS = ["", "\033[48;5;153m", "\033[48;5;157m", "\033[48;5;229m", "\033[48;5;223m",
           "\033[48;5;217m", "\033[48;5;183m"]
HTML_COLOURS = ["#ffffff", "#cfe4ff", "#d4f7d4", "#fff5b8", "#ffe0b8", "#ffc4c4", "#e6ccff"]


def chunks(tok, out, accepted):
    pieces, i = [], 0
    for n in accepted:
        pieces.append((tok.decode(out[i:i + n]), n))
        i += n
    return pieces


def viz_terminal(pieces):
    return "".join(f"{COLOURS[min(n, len(COLOURS) - 1)]}{text}\033[0m" for text, n in pieces)


def viz_html(pieces, title):
    spans = "".join(f'<span title="{n} tokens" style="background:{HTML_COLOURS[min(n, 6)]}">'
                    f"{html.escape(text)}</span>" for text, n in pieces)
    legend = " ".join(f'<span style="background:{c}">&nbsp;{i} tokens&nbsp;</span>'
                      for i, c in enumerate(HTML_COLOURS) if i)
    return (f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<body style='font-family:monospace'><p>{legend}</p>"
            f"<pre style='white-space:pre-wrap'>{spans}</pre></body>")
