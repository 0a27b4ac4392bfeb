# Sourced by the GPU scripts: install the wheels carried in .whl/ (`make gpu-carry`: datasets and what it needs,
# which the GPU machine's Python lacks) into /tmp/site and put that first on PYTHONPATH.
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
