from metal_engine.entrypoints.cli import main

raise SystemExit(main())
