"""The seven measurements of issue 8, one module each, in the order `python -m bench` runs them.

Each exposes `async def run(ctx: Context) -> Result`; a measurement whose feature has not landed
answers "not available" instead of failing the run.
"""
