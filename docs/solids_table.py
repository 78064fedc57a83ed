"""The README's table of text to 3D on a CPU: for each of the 3D shapes model's 12 classes, seed 0,

    python prolific.py "a <colour> <solid>" --model shapes --mesh --out RUNS/<colour>-<solid>

then measure_solid on the run (watertight mesh, IoU with the asked solid and the best other, nearest palette
colour of the surface, fog share of held-out views). Prints a markdown table and the wall time of each run.

    python docs/solids_table.py RUNS [class ...]      # e.g. python docs/solids_table.py /tmp/solids "red cube"

A run folder that already has particle0/mesh.glb is measured, not run again. Takes about 5 minutes a class on
2 cores once the model is cached (training it first: about 5 minutes more). Where node and the Khronos glTF
validator are installed (npm install gltf-validator; NODE_PATH=.../node_modules), each GLB is validated too.
"""
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import prolific as P  # noqa: E402


def validate(glb):
    """The glTF validator's error and warning counts for a GLB, e.g. "0/0"; "-" where it is not installed."""
    try:
        run = subprocess.run(["node", os.path.join(os.path.dirname(os.path.abspath(__file__)), "validate_glb.js"), glb],
                             capture_output=True, text=True)
    except OSError:
        return "-"
    found = re.search(r"errors (\d+) warnings (\d+)", run.stdout)
    return f"{found.group(1)}/{found.group(2)}" if found else "-"


def main(runs, classes):
    rows = []
    for name in classes:
        out = os.path.join(runs, name.replace(" ", "-"))
        took = "-"
        if not os.path.exists(os.path.join(out, "particle0", "mesh.glb")):
            start = time.time()
            subprocess.run([sys.executable, os.path.join(os.path.dirname(P.__file__), "prolific.py"), f"a {name}",
                            "--model", "shapes", "--mesh", "--out", out], check=True)
            took = f"{(time.time() - start) / 60:.1f} min"
        m = P.measure_solid(out)
        rows.append(f"| {name} | {'yes' if m['watertight'] else 'no'}{'' if m['oriented'] else ' (a face flipped)'} | {m['iou']:.2f} | {m['other']:.2f} | "
                    f"{m['colour']} | {100 * m['fog']:.1f}% | {'pass' if m['passed'] else 'FAIL'} | "
                    f"{validate(os.path.join(out, 'particle0', 'mesh.glb'))} | {took} |")
        print(rows[-1], flush=True)
    print("\n| asked | watertight | IoU asked | IoU best other | colour | fog | | GLB errors/warnings | run |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\n{sum('pass' in r for r in rows)} of {len(rows)} pass")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or P.SOLID_CLASSES)
