"""Serve the flow as the deployment ``rlhf/full`` (needs a Prefect server: see docs/pipeline.md)."""

from flows.rlhf import rlhf

if __name__ == "__main__":
    rlhf.serve(name="full", parameters={"params_file": "params.yaml"})
