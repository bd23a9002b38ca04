#!/bin/sh
# Makes speech.wav (16 kHz mono 16-bit) and speech.json (where the speech is) for the VAD test:
# three phrases synthesised by espeak-ng, each trimmed of its own leading and trailing
# silence by sox, laid out between known stretches of silence. Debian: apt install espeak-ng sox.
# Run from this directory; the outputs are committed, so the tests need neither tool.
set -eu
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
lead=1.0
gaps="1.5 1.2"
tail=1.0
i=0
for text in "Tether runs small models on the device." \
            "When the device is busy, it asks the cloud." \
            "Speech starts here, and it ends here."; do
  espeak-ng -v en-us -s 150 -w "$tmp/raw$i.wav" "$text"
  # Trim silence at both ends, then resample to 16 kHz mono 16-bit.
  sox "$tmp/raw$i.wav" -r 16000 -c 1 -b 16 "$tmp/p$i.wav" \
      silence 1 0.02 0.5% reverse silence 1 0.02 0.5% reverse
  i=$((i + 1))
done
sox -n -r 16000 -c 1 -b 16 "$tmp/lead.wav" trim 0 "$lead"
sox -n -r 16000 -c 1 -b 16 "$tmp/tail.wav" trim 0 "$tail"
set -- $gaps
sox -n -r 16000 -c 1 -b 16 "$tmp/g0.wav" trim 0 "$1"
sox -n -r 16000 -c 1 -b 16 "$tmp/g1.wav" trim 0 "$2"
sox "$tmp/lead.wav" "$tmp/p0.wav" "$tmp/g0.wav" "$tmp/p1.wav" "$tmp/g1.wav" "$tmp/p2.wav" \
    "$tmp/tail.wav" speech.wav
# The segments, from the trimmed phrases' lengths.
python3 - "$tmp" "$lead" $gaps <<'PY'
import json, subprocess, sys
tmp, lead, g0, g1 = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
def dur(p):
    return float(subprocess.check_output(["soxi", "-D", p]).decode().strip())
d = [dur(f"{tmp}/p{i}.wav") for i in range(3)]
t, segs = lead, []
for i, gap in enumerate([g0, g1, None]):
    segs.append({"start_s": round(t, 3), "end_s": round(t + d[i], 3)})
    t += d[i] + (gap or 0)
json.dump({"rate": 16000, "segments": segs, "total_s": round(dur("speech.wav"), 3)},
          open("speech.json", "w"), indent=1)
print(json.dumps(segs))
PY
