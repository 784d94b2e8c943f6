console.log("pack asset");
