"""Parameters and multiply-adds of every registered backbone, against the published figures.

    python benchmarks/complexity.py
"""

from __future__ import annotations

from _common import markdown_table, setup_logging, write_results

from facesphere.backbones import BACKBONES, build_backbone, count_complexity

# (parameters, multiply-adds, source); None where no figure was published
PUBLISHED = {
    "mobilefacenet": (0.99e6, 221e6, "MobileFaceNets (arXiv 1804.07573) Table 1/2, 112x112, D=128"),
    "iresnet18": (None, 2.6e9, "arcface_torch README 'FLOPs' column (multiply-adds), r18"),
    "iresnet50": (43.576e6, 6.3e9, "OpenVINO card of insightface LResNet50E-IR (43.576 MParams); arcface_torch README 6.3G"),
    "iresnet100": (65.132e6, 12.1e9, "OpenVINO card of insightface LResNet100E-IR; arcface_torch README 12.1G"),
    "iresnet200": (None, 23.5e9, "arcface_torch README 'FLOPs' column, r200"),
    "sphereface20": (22.7e6, 1.75e9, "counted from the architecture (arXiv 1704.08063 Table 2; github.com/wy1iu/sphereface prototxt)"),
    "sphereface64": (48.2e6, 6.1e9, "counted from the architecture (arXiv 1704.08063 Table 2; github.com/wy1iu/sphereface prototxt)"),
}


def main() -> None:
    setup_logging()
    rows, payload = [], {}
    for name in BACKBONES.names():
        model = build_backbone(name)
        c = count_complexity(model)
        published = PUBLISHED.get(name)
        row = [name, "x".join(map(str, model.input_size)), model.embedding_size, f"{c.parameters / 1e6:.3f}M",
               f"{c.multiply_adds / 1e6:.1f}M"]
        params, madds, source = published or (None, None, "")
        row += [f"{params / 1e6:.3f}M ({100 * (c.parameters / params - 1):+.2f}%)" if params else "",
                f"{madds / 1e6:.0f}M ({100 * (c.multiply_adds / madds - 1):+.2f}%)" if madds else "", source]
        rows.append(row)
        payload[name] = {"parameters": c.parameters, "multiply_adds": c.multiply_adds, "input_size": model.input_size,
                         "embedding_size": model.embedding_size, "published": published}
    table = markdown_table(["backbone", "input", "D", "params", "MAdds", "published params", "published MAdds", "source"], rows)
    print(table)
    write_results("complexity", {"backbones": payload}, table)


if __name__ == "__main__":
    main()
