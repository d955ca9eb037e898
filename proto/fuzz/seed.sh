#!/usr/bin/env bash
# Seeds the fuzz corpus with the real KPL vectors of the test fixture (one file each, prefixed
# with the shard-range selector byte 0).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$here/corpus/deaggregate" "$here/corpus/deaggregate_message"
python3 - "$here/../tests/fixtures/kpl_vectors.json" "$here/corpus" <<'PY'
import base64, json, sys
vectors = json.load(open(sys.argv[1]))["vectors"]
for i, v in enumerate(vectors):
    data = base64.b64decode(v["data_base64"])
    with open(f"{sys.argv[2]}/deaggregate/vector-{i}", "wb") as f:
        f.write(b"\x00" + data)
    if v["aggregated"]:
        # the message alone, between the magic and the digest
        with open(f"{sys.argv[2]}/deaggregate_message/vector-{i}", "wb") as f:
            f.write(data[4:-16])
PY
echo "seeded $(ls "$here/corpus/deaggregate" | wc -l) inputs"
