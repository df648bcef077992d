"""Fixtures shared by the tests, the benchmarks and the demo: tiny random models (`tiny`), diffusers-format
folders of them saved with PyTorch (`tiny_folders`), image and caption files (`data_files`), and pipelines built
both ways for parity checks (`pipeline_fixtures`). Nothing here downloads anything."""
