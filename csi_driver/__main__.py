from csi_driver.cli import main

raise SystemExit(main())
