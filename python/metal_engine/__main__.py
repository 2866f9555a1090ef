from metal_engine.cli import main

raise SystemExit(main())
