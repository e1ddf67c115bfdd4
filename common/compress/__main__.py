"""`python -m common.compress SPEC_JSON`: the measuring child of `common.compress.timing.measure_served`."""
import json
import sys

from common.compress.timing import CHILD_MARK, measure_child

print(CHILD_MARK + json.dumps(measure_child(json.loads(sys.argv[1]))), flush=True)
