from image_etl.cli import main

raise SystemExit(main())
